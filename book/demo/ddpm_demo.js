/* The "Try it" page (book/try_it.md): DDIM sampling with the book's trained U-Net, in the
 * reader's browser. No server: the network is model.onnx, run by ONNX Runtime Web on its
 * WebAssembly backend; the schedule (bar-alpha_t, the DDIM timesteps, the class names) is
 * read from schedule.json, both exported from the shipped checkpoint by ddpm_tutorial/export.py.
 * The network is class-conditional: the page asks for a class with classifier-free guidance
 * (one network call on a doubled batch, as ddpm_tutorial.sampling.guided_eps), or for "any"
 * garment with the null class (the unconditional model).
 *
 * Nothing heavy loads with the page: only manifest.json (a few hundred bytes). The runtime
 * and the model are fetched when the reader presses Generate.
 *
 * For tests: window.ddpmDemo.sample({xT, noises, steps, eta, y, w}) runs the sampler on given
 * x_T and per-step noise (arrays of N*784 numbers), class y (an index, or null: the null
 * class) and guidance scale w, and resolves to Float32Arrays and the recorded trajectory.
 */
(function () {
  "use strict";
  const BASE = new URL(".", document.currentScript.src).href;  // .../_static/demo/
  const N_IMAGES = 8;

  // --- Seeded noise: the same seed gives the same images on every browser ---------------

  // mulberry32: a 32-bit state, one add and a few multiply-xorshifts per number; uniform on [0, 1).
  function mulberry32(seed) {
    let state = seed >>> 0;
    return function () {
      state = (state + 0x6d2b79f5) >>> 0;
      let z = state;
      z = Math.imul(z ^ (z >>> 15), z | 1);
      z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
      return ((z ^ (z >>> 14)) >>> 0) / 4294967296;
    };
  }

  // Box-Muller: two uniforms u1, u2 give two independent N(0, 1) numbers
  // r cos(2 pi u2) and r sin(2 pi u2), with r = sqrt(-2 ln u1).
  function gaussian(rand, n) {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i += 2) {
      const r = Math.sqrt(-2 * Math.log(1 - rand()));  // 1 - u lies in (0, 1]: log never sees 0
      const angle = 2 * Math.PI * rand();
      out[i] = r * Math.cos(angle);
      if (i + 1 < n) out[i + 1] = r * Math.sin(angle);
    }
    return out;
  }

  // --- The sampler: the DDIM update of chapter 6 ------------------------------------------

  // <ddim-step>
  // One DDIM step (Song et al. 2021, Eq. 12), from timestep t to the
  // next timestep s of tau; ab_t = bar-alpha_t, read from schedule.json:
  //   x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
  //   sigma  = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)
  //   x_s    = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps + sigma z
  // After the last step ab_s = 1 (x_s is x_0), so sigma = 0 there.
  function ddimStep(x, eps, abT, abS, eta, z) {
    const sigma = eta * Math.sqrt(
      Math.max(0, ((1 - abS) / (1 - abT)) * (1 - abT / abS)));
    // weight of eps in x_s: the "direction pointing to x_t"
    const dir = Math.sqrt(Math.max(0, 1 - abS - sigma * sigma));
    const x0 = new Float32Array(x.length);
    const xs = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++) {
      x0[i] = (x[i] - Math.sqrt(1 - abT) * eps[i]) / Math.sqrt(abT);
      xs[i] = Math.sqrt(abS) * x0[i] + dir * eps[i]
        + (sigma > 0 ? sigma * z[i] : 0);
    }
    return { x0, xs };
  }
  // </ddim-step>

  // --- Loading, once, on first use ---------------------------------------------------------

  let manifest = null, loading = null;

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = resolve;
      s.onerror = () => reject(new Error(`could not load ${src}`));
      document.head.appendChild(s);
    });
  }

  function load() {
    loading = loading || (async () => {
      await loadScript(BASE + "ort/ort.wasm.min.js");                 // defines window.ort
      const ort = window.ort;
      ort.env.wasm.numThreads = 1;   // one thread needs no SharedArrayBuffer, so no cross-origin isolation
      ort.env.wasm.wasmPaths = BASE + "ort/";
      const [schedule, session] = await Promise.all([
        fetch(BASE + "schedule.json").then((r) => r.json()),
        ort.InferenceSession.create(BASE + "model.onnx", { executionProviders: ["wasm"] }),
      ]);
      return { ort, schedule, session };
    })();
    loading.catch(() => { loading = null; });   // a failed load (network) may be retried
    return loading;
  }

  // The network on a batch of n images, all at timestep t (a code index 0..T-1); labels:
  // n class indices for a conditional network (K = the null class), else null.
  async function network({ ort, session, schedule }, x, t, n, labels) {
    const size = schedule.image_size, c = schedule.in_channels;
    const feeds = {
      x_t: new ort.Tensor("float32", x, [n, c, size, size]),
      t: new ort.Tensor("int64", new BigInt64Array(n).fill(BigInt(t)), [n]),
    };
    if (labels) feeds.y = new ort.Tensor("int64", BigInt64Array.from(labels, BigInt), [n]);
    return (await session.run(feeds)).eps.data;
  }

  // <guidance>
  // eps for n images at timestep t, as ddpm_tutorial.sampling.guided_eps computes it.
  // Classifier-free guidance (Ho & Salimans 2022, Eq. 6) towards class y with scale w:
  //   eps~ = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, null)
  // Both terms come from ONE network call on a doubled batch of 2n images:
  // the first n labelled y, the last n labelled null (index K).
  // y null: the null class alone, i.e. the unconditional model.
  async function predictEps(rt, x, t, n, y, w) {
    const K = rt.schedule.num_classes || 0;
    if (!K) return network(rt, x, t, n, null);                // an unconditional network
    if (y === null) return network(rt, x, t, n, new Array(n).fill(K));
    if (w === 0) return network(rt, x, t, n, new Array(n).fill(y));
    const both = new Float32Array(2 * x.length);              // (2n, C, H, W): x twice
    both.set(x);
    both.set(x, x.length);
    const labels = [...new Array(n).fill(y), ...new Array(n).fill(K)];
    const eps = await network(rt, both, t, 2 * n, labels);
    const guided = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++)                        // eps[i]: with y; eps[i + len]: null
      guided[i] = (1 + w) * eps[i] - w * eps[i + x.length];
    return guided;
  }
  // </guidance>

  // The request, checked once before the loop (as sampling._labels): y a class index in
  // [0, K) or null; w a finite number >= 0, and 0 when there is no class to guide towards.
  function checkRequest(schedule, y, w) {
    const K = schedule.num_classes || 0;
    if (!(Number.isFinite(w) && w >= 0)) throw new Error(`guidance scale w must be a finite number >= 0, got ${w}`);
    if (y === null) {
      if (w) throw new Error("guidance needs a class to guide towards (y)");
      return;
    }
    if (!K) throw new Error("this network has no classes (an unconditional model): sample it with y = null");
    if (!(Number.isInteger(y) && y >= 0 && y < K)) throw new Error(`y must be a class index in [0, ${K}) or null, got ${y}`);
  }

  // The loop: for each t of tau, predict eps, step (Eq. 12). xT: N*C*H*W numbers; noises[i]:
  // the z of step i (only read when eta > 0), else drawn from rand; y, w: the class and the
  // guidance scale. onStep sees x_t and x0_hat. Returns the clamped samples, the last x0_hat,
  // each step's time and the trajectory: {t, x (x_t), x0 (x0_hat)} for every step.
  async function sample({ xT, noises = null, steps = 50, eta = 0, rand = null, onStep = null, y = null, w = 0 }) {
    const rt = await load();
    const taus = rt.schedule.ddim_timesteps[String(steps)];
    if (!taus) throw new Error(`no DDIM timesteps for ${steps} steps in schedule.json`);
    if (eta > 0 && !noises && !rand) throw new Error("eta > 0 needs noises or a seeded rand");
    checkRequest(rt.schedule, y, w);
    const ab = rt.schedule.alpha_bar;
    const pixels = rt.schedule.in_channels * rt.schedule.image_size ** 2;
    let x = Float32Array.from(xT), x0 = null;
    const n = x.length / pixels, stepMs = [], trajectory = [];
    for (let i = 0; i < taus.length; i++) {
      const start = performance.now();
      const eps = await predictEps(rt, x, taus[i], n, y, w);             // 1. predict eps
      const abS = i + 1 < taus.length ? ab[taus[i + 1]] : 1.0;
      const z = eta > 0 ? (noises ? Float32Array.from(noises[i]) : gaussian(rand, x.length)) : null;
      const step = ddimStep(x, eps, ab[taus[i]], abS, eta, z);           // 2.-4. x0_hat, x_s
      stepMs.push(performance.now() - start);
      trajectory.push({ t: taus[i], x, x0: step.x0 });
      if (onStep) await onStep({ i, t: taus[i], x, x0: step.x0, ms: stepMs[i] });
      x = step.xs;
      x0 = step.x0;
    }
    return { images: x.map((v) => Math.min(1, Math.max(-1, v))), x0, stepMs, trajectory };
  }

  // --- The page -----------------------------------------------------------------------------

  function draw(canvas, values, n) {
    const side = Math.round(Math.sqrt(values.length / n));             // one channel, square images
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(n * side, side);
    for (let k = 0; k < n; k++)
      for (let r = 0; r < side; r++)
        for (let c = 0; c < side; c++) {
          const v = values[k * side * side + r * side + c];
          const g = Math.round(Math.min(255, Math.max(0, (v + 1) * 127.5)));  // [-1, 1] -> [0, 255]
          const p = 4 * (r * n * side + k * side + c);
          img.data[p] = img.data[p + 1] = img.data[p + 2] = g;
          img.data[p + 3] = 255;
        }
    ctx.putImageData(img, 0, 0);
  }

  const mb = (bytes) => (bytes / 1e6).toFixed(1) + " MB";
  const nextFrame = () => new Promise((resolve) => setTimeout(resolve, 0));

  const escapeHtml = (text) => String(text).replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);

  function build(root, classNames) {
    // The class picker: "any" (the null class: the unconditional model), then the classes.
    const options = classNames.map((name, k) => `<option value="${k}">${escapeHtml(name)}</option>`).join("");
    root.innerHTML = `
      <div class="ddpm-demo-controls">
        <label>class <select name="class"><option value="any" selected>any (unconditional)</option>${options}</select></label>
        <label>guidance w <input name="guidance" type="range" min="0" max="5" step="0.5" value="1" disabled>
          <output name="guidance-out">1.0</output></label>
        <label>seed <input name="seed" type="number" min="0" max="4294967295" step="1" value="0"></label>
        <label>DDIM steps <input name="steps" type="range" min="10" max="100" step="1" value="25">
          <output name="steps-out">25</output></label>
        <label>&eta; <input name="eta" type="range" min="0" max="1" step="0.1" value="0">
          <output name="eta-out">0.0</output></label>
        <button type="button" name="generate" disabled>Generate</button>
      </div>
      <p class="ddpm-demo-row">x<sub>t</sub>, the images the sampler holds at step t<span class="ddpm-demo-xt-label"></span></p>
      <canvas class="ddpm-demo-xt" width="224" height="28"></canvas>
      <p class="ddpm-demo-row">x&#770;<sub>0</sub>, the network's guess of the finished images from that x<sub>t</sub></p>
      <canvas class="ddpm-demo-x0" width="224" height="28"></canvas>
      <label class="ddpm-demo-scrub">step of the last run <input name="scrub" type="range" min="0" max="0" step="1" value="0" disabled>
        <output name="scrub-out">(after a run)</output></label>
      <p class="ddpm-demo-status" aria-live="polite">Reading the demo's manifest&hellip;</p>`;
    const style = document.createElement("style");
    style.textContent = `
      .ddpm-demo canvas { width: 100%; image-rendering: pixelated; background: #000; display: block; }
      .ddpm-demo-controls { display: flex; flex-wrap: wrap; gap: 0.5em 1.5em; align-items: center; margin-bottom: 0.8em; }
      .ddpm-demo-controls input[type=number] { width: 8em; }
      .ddpm-demo-scrub { display: flex; gap: 0.8em; align-items: center; margin-top: 0.6em; }
      .ddpm-demo-scrub input { flex: 1; }
      .ddpm-demo-scrub output { min-width: 11em; }   /* the slider keeps its length as the label changes */
      .ddpm-demo-row { margin: 0.6em 0 0.2em; font-size: 0.9em; }
      .ddpm-demo-note { border-left: 4px solid #c60; padding: 0.5em 1em; background: #fff6ec; }`;
    document.head.appendChild(style);
    const q = (name) => root.querySelector(`[name="${name}"]`);
    for (const name of ["steps", "eta", "guidance"])
      q(name).addEventListener("input", () => { q(name + "-out").value = Number(q(name).value).toFixed(name === "steps" ? 0 : 1); });
    // w only means something with a class to guide towards.
    q("class").addEventListener("change", () => { q("guidance").disabled = q("class").value === "any"; });
    return {
      cls: q("class"), guidance: q("guidance"), scrub: q("scrub"), scrubOut: q("scrub-out"),
      seed: q("seed"), steps: q("steps"), eta: q("eta"), button: q("generate"),
      xt: root.querySelector(".ddpm-demo-xt"), x0: root.querySelector(".ddpm-demo-x0"),
      status: root.querySelector(".ddpm-demo-status"), xtLabel: root.querySelector(".ddpm-demo-xt-label"),
    };
  }

  function showNote(root, text) {
    root.dataset.state = "unavailable";
    root.innerHTML = "";
    const note = document.createElement("p");
    note.className = "ddpm-demo-note";
    note.textContent = "The in-browser demo is not available in this build of the book: " + text;
    root.appendChild(note);
  }

  // The timestep slider: after a run, frame i < steps shows x_t and x0_hat at the i-th t of
  // tau (the live twin of the book's static sliders); frame "steps" shows the samples.
  let frames = [];

  function showFrame(ui, i) {
    const f = frames[i];
    draw(ui.xt, f.x, N_IMAGES);
    draw(ui.x0, f.x0, N_IMAGES);
    ui.scrubOut.value = f.label;
    ui.xtLabel.textContent = f.t === null ? ": after the last step, the samples" : ` (at t = ${f.t})`;
  }

  function keepRun(ui, result) {
    frames = result.trajectory.map((s, i) => ({ t: s.t, x: s.x, x0: s.x0,
      label: `step ${i + 1} of ${result.trajectory.length}: t = ${s.t}` }));
    frames.push({ t: null, x: result.images, x0: result.x0, label: "the samples (x\u2080)" });
    ui.scrub.max = String(frames.length - 1);
    ui.scrub.value = String(frames.length - 1);
    ui.scrub.disabled = false;
    showFrame(ui, frames.length - 1);
  }

  async function generate(root, ui) {
    const seed = Number(ui.seed.value) >>> 0, steps = Number(ui.steps.value), eta = Number(ui.eta.value);
    const y = ui.cls.value === "any" ? null : Number(ui.cls.value);
    const w = y === null ? 0 : Number(ui.guidance.value);
    const what = y === null ? "any class (unconditional)"
      : `${manifest.model.class_names[y]}, w = ${w.toFixed(1)}`;
    root.dataset.state = "running";
    ui.button.disabled = true;
    ui.scrub.disabled = true;
    try {
      if (!window.ort) ui.status.textContent = `Loading ONNX Runtime Web and the model (${mb(manifest.page_weight_bytes)}, once)…`;
      const { schedule } = await load();
      const rand = mulberry32(seed);
      const xT = gaussian(rand, N_IMAGES * schedule.in_channels * schedule.image_size ** 2);  // x_T ~ N(0, I)
      const start = performance.now();
      const result = await sample({ xT, steps, eta, rand, y, w, onStep: async (s) => {
        draw(ui.xt, s.x, N_IMAGES);
        draw(ui.x0, s.x0, N_IMAGES);
        ui.xtLabel.textContent = ` (now t = ${s.t})`;
        ui.status.textContent = `step ${s.i + 1} / ${steps}, t = ${s.t}: ${s.ms.toFixed(0)} ms for this step`;
        await nextFrame();                                                // let the browser paint
      } });
      keepRun(ui, result);
      const totalMs = performance.now() - start;
      const meanStep = result.stepMs.reduce((a, b) => a + b, 0) / steps;
      const batch = w > 0 ? `all ${2 * N_IMAGES} at once: ${N_IMAGES} with the class, ${N_IMAGES} with the null class`
        : `all ${N_IMAGES} at once`;
      ui.status.textContent = `Done: ${what}, seed ${seed}, ${steps} DDIM steps, \u03b7 = ${eta.toFixed(1)}, ${N_IMAGES} images in `
        + `${(totalMs / 1000).toFixed(2)} s: ${meanStep.toFixed(1)} ms per step (the network on ${batch}), `
        + `${(totalMs / N_IMAGES / 1000).toFixed(2)} s per image. Drag the step slider to go back through the run.`;
      api.lastRun = { seed, steps, eta, y, w, stepMs: result.stepMs, totalMs, images: Array.from(result.images),
                      timesteps: result.trajectory.map((s) => s.t) };
      root.dataset.state = "done";
    } catch (err) {
      root.dataset.state = "error";
      ui.status.textContent = "The demo failed: " + err.message;
      throw err;
    } finally {
      ui.button.disabled = false;
    }
  }

  async function init() {
    const root = document.getElementById("ddpm-demo");
    if (!root) return;
    root.textContent = "Reading the demo's manifest\u2026";
    try {
      const response = await fetch(BASE + "manifest.json");
      if (!response.ok) throw new Error(`manifest.json: HTTP ${response.status}`);
      manifest = await response.json();
    } catch (err) {
      showNote(root, "its files are missing from the site (" + err.message + ").");
      return;
    }
    if (!manifest.ready) {
      const reasons = [manifest.model.missing, manifest.runtime.missing].filter(Boolean);
      showNote(root, reasons.join(" "));
      return;
    }
    const ui = build(root, manifest.model.class_names || []);
    if (!manifest.model.class_names) ui.cls.closest("label").hidden = ui.guidance.closest("label").hidden = true;
    ui.scrub.addEventListener("input", () => frames.length && showFrame(ui, Number(ui.scrub.value)));
    ui.status.textContent = `Press Generate: the first press downloads ${mb(manifest.page_weight_bytes)} `
      + `(ONNX Runtime Web ${manifest.runtime.version} and the network), once.`;
    ui.button.disabled = false;
    ui.button.addEventListener("click", () => generate(root, ui).catch((err) => console.error(err)));
    root.dataset.state = "ready";
  }

  const api = { sample, load, mulberry32, gaussian, ddimStep, predictEps, lastRun: null };
  window.ddpmDemo = api;
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();

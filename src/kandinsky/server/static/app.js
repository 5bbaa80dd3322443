/* Kandinsky studio: the web page of `kandinsky serve`. Plain JavaScript, no dependencies, works offline. */
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "kandinsky.apiKey";

  const state = {
    mode: "txt2img",
    key: localStorage.getItem(KEY_STORAGE) || "",
    images: { img2img: null, inpaint: null, variations: null }, // {url, width, height}
    mix: [], // {kind: "text"|"image", text, url, weight}
    lastSeed: null,
    job: null, // the running job's id
    busy: false,
    defaults: null,
    erase: false,
  };
  // What the browser tests read: every progress fraction seen, and the requests sent.
  const studio = (window.kandinskyStudio = { progressLog: [], requests: [], previews: 0, state });

  // ---------------------------------------------------------------------------------------------- API

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (state.key) h.Authorization = "Bearer " + state.key;
    return h;
  }

  async function api(path, options = {}) {
    const opts = Object.assign({}, options, { headers: headers(options.headers) });
    const res = await fetch(path, opts);
    if (res.status === 401) {
      await askKey();
      if (state.key) return fetch(path, Object.assign({}, options, { headers: headers(options.headers) }));
    }
    return res;
  }

  function askKey() {
    return new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-input").value = state.key;
      dialog.addEventListener("close", function onClose() {
        dialog.removeEventListener("close", onClose);
        if (dialog.returnValue === "save") {
          state.key = $("key-input").value.trim();
          localStorage.setItem(KEY_STORAGE, state.key);
        }
        resolve();
      });
      if (!dialog.open) dialog.showModal();
    });
  }

  async function errorText(res) {
    try {
      const body = await res.json();
      if (body.error) return body.error;
      if (typeof body.detail === "string") return body.detail;
      return JSON.stringify(body.detail || body);
    } catch (e) {
      return res.status + " " + res.statusText;
    }
  }

  // ---------------------------------------------------------------------------------------------- status

  function setStatus(text, cls) {
    const el = $("status");
    el.textContent = text;
    el.className = "pill " + (cls || "");
  }

  async function loadModels() {
    try {
      const res = await api("/v1/models");
      if (!res.ok) throw new Error(await errorText(res));
      const info = await res.json();
      const model = info.models[0] || {};
      const sel = $("sampler");
      sel.innerHTML = "";
      for (const name of info.samplers) {
        const o = document.createElement("option");
        o.value = o.textContent = name;
        sel.appendChild(o);
      }
      const lora = $("lora");
      const chosen = lora.value;
      lora.innerHTML = '<option value="">none</option>';
      for (const item of info.loras || []) {
        const o = document.createElement("option");
        o.value = item.name;
        o.textContent = item.name + (item.trigger_words && item.trigger_words.length
          ? " (" + item.trigger_words.join(", ") + ")" : "");
        lora.appendChild(o);
      }
      lora.value = chosen;
      $("lora-row").hidden = !(info.loras && info.loras.length);
      if (model.defaults) {
        applyDefaults(model.defaults);
      }
      const lim = info.limits || {};
      if (lim.max_steps) { $("steps").max = lim.max_steps; $("prior-steps").max = lim.max_steps; }
      if (lim.max_images) $("num").max = lim.max_images;
      document.querySelectorAll(".tab").forEach((t) => {
        const ok = !model.modes || model.modes.includes(t.dataset.mode);
        t.disabled = info.state === "ready" && !ok;
        t.title = t.disabled ? "this server has no model for " + t.dataset.mode : "";
      });
      if (info.state === "ready") setStatus((model.name || "model") + " · ready", "ready");
      else if (info.state === "failed") setStatus("model failed to load", "bad");
      else { setStatus("loading model…", "busy"); setTimeout(loadModels, 1000); }
    } catch (e) {
      setStatus("offline", "bad");
      setTimeout(loadModels, 3000);
    }
  }

  function applyDefaults(d) {
    if (!state.defaults) {
      $("width").value = d.width; $("height").value = d.height; $("steps").value = d.steps;
      $("guidance").value = d.guidance; $("prior-steps").value = d.prior_steps;
      $("prior-guidance").value = d.prior_guidance; $("strength").value = d.strength;
      $("sampler").value = d.sampler;
      syncOutputs();
    } else {
      $("sampler").value = $("sampler").dataset.want || d.sampler;
    }
    state.defaults = d;
  }

  // ---------------------------------------------------------------------------------------------- modes

  function setMode(mode) {
    state.mode = mode;
    document.querySelectorAll(".tab").forEach((t) => {
      const on = t.dataset.mode === mode;
      t.classList.toggle("active", on);
      t.setAttribute("aria-selected", on ? "true" : "false");
    });
    document.querySelectorAll(".mode-panel").forEach((p) => (p.hidden = p.dataset.for !== mode));
    const optional = mode === "mix" || mode === "variations";
    $("prompt-label").textContent = optional ? "Text for the decoder (optional)" : "Prompt";
    $("prompt").placeholder = optional ? "optional" : "a red circle on a blue background";
    document.querySelector("details.advanced").hidden = mode === "variations";
  }

  function syncOutputs() {
    $("guidance-value").textContent = Number($("guidance").value).toFixed(1);
    $("strength-value").textContent = Number($("strength").value).toFixed(2);
    $("brush-value").textContent = $("brush").value;
  }

  // ---------------------------------------------------------------------------------------------- images in

  function readFile(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("cannot read this image"));
      img.src = url;
    });
  }

  async function setImage(mode, url) {
    const img = await loadImage(url);
    state.images[mode] = { url, width: img.naturalWidth, height: img.naturalHeight };
    if (mode === "inpaint") {
      const base = $("inpaint-image"), mask = $("inpaint-mask");
      base.width = mask.width = img.naturalWidth;
      base.height = mask.height = img.naturalHeight;
      base.getContext("2d").drawImage(img, 0, 0);
      mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
      $("inpaint-stage").hidden = false;
      $("inpaint-hint").classList.add("dim");
    } else {
      const preview = $(mode + "-preview");
      preview.src = url;
      preview.hidden = false;
    }
  }

  function wireDrop(zoneId, onFiles) {
    const zone = $(zoneId);
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
      const files = [...(e.dataTransfer.files || [])].filter((f) => f.type.startsWith("image/"));
      if (files.length) onFiles(files);
      else {
        const url = e.dataTransfer.getData("text/uri-list") || e.dataTransfer.getData("text/plain");
        if (url && url.startsWith("data:image/")) onFiles([], url);
      }
    });
  }

  function wireSingle(mode) {
    const take = async (files, url) => {
      try { await setImage(mode, url || (await readFile(files[0]))); } catch (e) { showError(e.message); }
    };
    $(mode + "-file").addEventListener("change", (e) => { if (e.target.files.length) take(e.target.files); });
    wireDrop(mode + "-drop", take);
  }

  // ---------------------------------------------------------------------------------------------- mixing

  function addMixItem(item) {
    state.mix.push(Object.assign({ weight: 0.5 }, item));
    renderMix();
  }

  function renderMix() {
    const list = $("mix-items");
    list.innerHTML = "";
    if (!state.mix.length) {
      const li = document.createElement("li");
      li.className = "mix-empty";
      li.textContent = "Add prompts and images to mix.";
      list.appendChild(li);
    }
    state.mix.forEach((item, i) => {
      const li = document.createElement("li");
      li.className = "mix-item";
      li.dataset.kind = item.kind;
      let thumb;
      if (item.kind === "image") {
        thumb = document.createElement("img");
        thumb.src = item.url;
        thumb.alt = "mix image " + (i + 1);
      } else {
        thumb = document.createElement("div");
        thumb.textContent = "T";
      }
      thumb.className = "thumb";
      const body = document.createElement("div");
      body.className = "body";
      if (item.kind === "text") {
        const input = document.createElement("input");
        input.type = "text";
        input.className = "mix-text";
        input.placeholder = "a prompt to mix";
        input.value = item.text || "";
        input.addEventListener("input", () => (item.text = input.value));
        body.appendChild(input);
      } else {
        const label = document.createElement("span");
        label.className = "dim";
        label.textContent = "image " + (i + 1);
        body.appendChild(label);
      }
      const w = document.createElement("label");
      w.className = "weight";
      const range = document.createElement("input");
      range.type = "range"; range.min = "0"; range.max = "1"; range.step = "0.05"; range.value = item.weight;
      range.className = "mix-weight";
      const out = document.createElement("output");
      out.textContent = Number(item.weight).toFixed(2);
      range.addEventListener("input", () => { item.weight = Number(range.value); out.textContent = item.weight.toFixed(2); });
      w.append("weight", range, out);
      body.appendChild(w);
      const remove = document.createElement("button");
      remove.type = "button"; remove.className = "ghost remove"; remove.textContent = "×";
      remove.title = "remove"; remove.setAttribute("aria-label", "remove");
      remove.addEventListener("click", () => { state.mix.splice(i, 1); renderMix(); });
      li.append(thumb, body, remove);
      list.appendChild(li);
    });
  }

  async function addMixFiles(files, url) {
    try {
      if (url) addMixItem({ kind: "image", url });
      for (const f of files) addMixItem({ kind: "image", url: await readFile(f) });
    } catch (e) { showError(e.message); }
  }

  // ---------------------------------------------------------------------------------------------- mask brush

  function wireBrush() {
    const mask = $("inpaint-mask");
    const ctx = mask.getContext("2d");
    let drawing = false, last = null;
    const point = (e) => {
      const r = mask.getBoundingClientRect();
      return { x: (e.clientX - r.left) * (mask.width / r.width), y: (e.clientY - r.top) * (mask.height / r.height),
               scale: mask.width / r.width };
    };
    const stroke = (a, b) => {
      ctx.globalCompositeOperation = state.erase ? "destination-out" : "source-over";
      ctx.strokeStyle = ctx.fillStyle = "rgb(255, 64, 129)";
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.lineWidth = Math.max(1, Number($("brush").value) * b.scale);
      ctx.beginPath();
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x + 0.01, b.y);
      ctx.stroke();
    };
    mask.addEventListener("pointerdown", (e) => {
      drawing = true; last = point(e); stroke(last, last);
      mask.setPointerCapture(e.pointerId);
    });
    mask.addEventListener("pointermove", (e) => {
      if (!drawing) return;
      const p = point(e); stroke(last, p); last = p;
    });
    const end = () => { drawing = false; last = null; };
    mask.addEventListener("pointerup", end);
    mask.addEventListener("pointercancel", end);
    $("mask-clear").addEventListener("click", () => ctx.clearRect(0, 0, mask.width, mask.height));
    $("mask-erase").addEventListener("click", (e) => {
      state.erase = !state.erase;
      e.currentTarget.setAttribute("aria-pressed", state.erase ? "true" : "false");
    });
    $("brush").addEventListener("input", syncOutputs);
  }

  // The mask the server wants: the image's size, white where painted, black elsewhere.
  function exportMask() {
    const mask = $("inpaint-mask");
    const src = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
    const out = document.createElement("canvas");
    out.width = mask.width; out.height = mask.height;
    const octx = out.getContext("2d");
    const data = octx.createImageData(mask.width, mask.height);
    let painted = 0;
    for (let i = 0; i < src.data.length; i += 4) {
      const on = src.data[i + 3] > 0 ? 255 : 0;
      painted += on ? 1 : 0;
      data.data[i] = data.data[i + 1] = data.data[i + 2] = on;
      data.data[i + 3] = 255;
    }
    octx.putImageData(data, 0, 0);
    return { url: out.toDataURL("image/png"), painted };
  }

  // ---------------------------------------------------------------------------------------------- request

  function num(id) {
    const v = $(id).value.trim();
    return v === "" ? null : Number(v);
  }

  function buildRequest() {
    const mode = state.mode;
    const body = {
      negative_prompt: $("negative").value.trim() || null,
      width: num("width"), height: num("height"), steps: num("steps"), guidance_scale: num("guidance"),
      sampler: $("sampler").value || null, seed: num("seed"), num_images: num("num") || 1,
    };
    if ($("lora").value) body.loras = [{ name: $("lora").value, scale: num("lora-scale") ?? 1 }];
    if (mode !== "variations") {
      body.prior_steps = num("prior-steps");
      body.prior_guidance_scale = num("prior-guidance");
    }
    const prompt = $("prompt").value;
    if (mode === "txt2img" || mode === "img2img" || mode === "inpaint") {
      if (!prompt.trim()) throw new Error("write a prompt first");
      body.prompt = prompt;
    } else {
      body.prompt = prompt;
    }
    if (mode === "img2img" || mode === "inpaint" || mode === "variations") {
      const img = state.images[mode];
      if (!img) throw new Error("choose an image first");
      body.image = img.url;
    }
    if (mode === "img2img") body.strength = Number($("strength").value);
    if (mode === "inpaint") {
      const m = exportMask();
      if (!m.painted) throw new Error("paint the part to repaint on the image first");
      body.mask = m.url;
    }
    if (mode === "mix") {
      const items = state.mix
        .filter((it) => it.kind === "image" || (it.text || "").trim())
        .map((it) => (it.kind === "image" ? { image: it.url, weight: it.weight } : { text: it.text, weight: it.weight }));
      if (!items.length) throw new Error("add at least one prompt or image to mix");
      body.items = items;
    }
    for (const k of Object.keys(body)) if (body[k] === null) delete body[k];
    return body;
  }

  // ---------------------------------------------------------------------------------------------- progress

  function setProgress(fraction, text) {
    const pct = Math.max(0, Math.min(100, Math.round(fraction * 100)));
    $("progress-fill").style.width = pct + "%";
    $("progress").setAttribute("aria-valuenow", String(pct));
    $("progress-text").textContent = text;
    studio.progressLog.push(fraction);
  }

  function showPreview(b64) {
    const img = $("preview");
    img.src = "data:image/png;base64," + b64;
    studio.previews += 1;
    img.hidden = false;
    $("viewer-empty").hidden = true;
  }

  function showError(msg) {
    const el = $("error");
    el.textContent = msg;
    el.hidden = !msg;
  }

  function setBusy(busy) {
    state.busy = busy;
    $("generate").disabled = busy;
    $("cancel").disabled = !busy;
    $("generate").textContent = busy ? "Generating…" : "Generate";
  }

  async function follow(id) {
    // Server-Sent Events read with fetch, so that the API key can travel in a header.
    const res = await api("/v1/jobs/" + id + "/events", { headers: { Accept: "text/event-stream" } });
    if (!res.ok || !res.body) throw new Error(await errorText(res));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message", data = "";
        for (const line of frame.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (!data) continue;
        const payload = JSON.parse(data);
        const final = handleEvent(event, payload);
        if (final) { reader.cancel().catch(() => {}); return final; }
      }
    }
    // The stream ended early (a proxy, a restart): ask once more.
    const job = await (await api("/v1/jobs/" + id)).json();
    if (job.state === "done") return { state: "done", result: job.result };
    return { state: job.state, error: job.error };
  }

  function handleEvent(event, d) {
    if (event === "queued") setProgress(0, d.position > 1 ? "queued, position " + d.position : "queued");
    else if (event === "started") setProgress(0, "starting…");
    else if (event === "progress") setProgress(d.fraction, d.stage + " " + d.done + "/" + d.total);
    else if (event === "preview" && d.image) showPreview(d.image);
    else if (event === "done") { setProgress(1, "done in " + d.timings.run_s.toFixed(1) + " s"); return { state: "done", result: d }; }
    else if (event === "failed") return { state: "failed", error: d.error };
    else if (event === "cancelled") return { state: "cancelled", error: d.reason };
    return null;
  }

  async function generate(ev) {
    if (ev) ev.preventDefault();
    if (state.busy) return;
    showError("");
    let body;
    try { body = buildRequest(); } catch (e) { showError(e.message); return; }
    const mode = state.mode;
    studio.requests.push({ mode, body });
    setBusy(true);
    setProgress(0, "sending…");
    try {
      const res = await api("/v1/" + mode + "?async=true", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      if (res.status === 429) {
        const wait = res.headers.get("Retry-After");
        throw new Error("the server is busy (queue full); try again" + (wait ? " in " + wait + " s" : ""));
      }
      if (!res.ok) throw new Error(await errorText(res));
      const job = await res.json();
      state.job = job.id;
      const end = await follow(job.id);
      if (end.state === "done") addResults(end.result, body);
      else if (end.state === "cancelled") setProgress(0, "cancelled");
      else throw new Error(end.error || "the job failed");
    } catch (e) {
      showError(e.message);
      setProgress(0, "failed");
    } finally {
      state.job = null;
      setBusy(false);
    }
  }

  async function cancel() {
    if (!state.job) return;
    $("cancel").disabled = true;
    await api("/v1/jobs/" + state.job, { method: "DELETE" });
  }

  // ---------------------------------------------------------------------------------------------- gallery

  function addResults(result, body) {
    const gallery = $("gallery");
    const tpl = $("card-template");
    let first = null;
    const cards = [];
    for (const im of result.images) {
      const url = "data:image/png;base64," + im.image;
      const card = tpl.content.firstElementChild.cloneNode(true);
      const rec = im.record || {};
      card.dataset.mode = rec.mode || result.mode;
      card.dataset.seed = im.seed;
      const img = card.querySelector("img");
      img.src = url;
      if (im.width < 256) img.classList.add("pixelated");
      card.querySelector(".card-image").addEventListener("click", () => showImage(url));
      card.querySelector(".card-prompt").textContent = describe(rec, result.mode);
      card.querySelector(".card-prompt").title = im.parameters;
      card.querySelector(".card-meta").textContent =
        [rec.mode, im.width + "×" + im.height, (rec.steps || "?") + " steps", rec.sampler,
         "cfg " + rec.guidance, "seed " + im.seed].filter(Boolean).join(" · ");
      const dl = card.querySelector(".download");
      dl.href = url;
      dl.download = "kandinsky-" + im.seed + (im.index ? "-" + im.index : "") + ".png";
      card.querySelectorAll("button[data-action]").forEach((b) =>
        b.addEventListener("click", () => cardAction(b.dataset.action, url, rec, im)));
      cards.push(card);
      first = first || url;
    }
    gallery.prepend(...cards);
    if (first) showImage(first);
    if (result.images.length) state.lastSeed = result.images[0].seed;
  }

  function showImage(url) {
    const view = $("preview");
    view.src = url;
    view.hidden = false;
    $("viewer-empty").hidden = true;
  }

  function describe(rec, mode) {
    if (rec.mode === "mix" && Array.isArray(rec.items)) {
      const texts = rec.items.filter((it) => it.text).map((it) => "“" + it.text + "”");
      const images = rec.items.filter((it) => it.image).length;
      const parts = texts.concat(images ? [images + (images > 1 ? " images" : " image")] : []);
      return "mix: " + parts.join(" + ") + (rec.prompt ? " · " + rec.prompt : "");
    }
    if (rec.mode === "variations") return "variations" + (rec.prompt ? ": " + rec.prompt : "");
    return rec.prompt || "(" + (rec.mode || mode) + ")";
  }

  async function cardAction(action, url, rec, im) {
    if (action === "reuse") {
      if (rec.prompt != null) $("prompt").value = rec.prompt;
      $("negative").value = rec.negative || "";
      for (const [id, key] of [["width", "width"], ["height", "height"], ["steps", "steps"],
        ["prior-steps", "prior_steps"], ["prior-guidance", "prior_guidance"]]) {
        if (rec[key] != null) $(id).value = rec[key];
      }
      if (rec.guidance != null) $("guidance").value = rec.guidance;
      if (rec.sampler) $("sampler").value = rec.sampler;
      const used = (rec.loras || [])[0];
      const name = used ? String(used[0]).split(/[\\/]/).pop().replace(/\.safetensors$/, "") : "";
      if ([...$("lora").options].some((o) => o.value === name)) {
        $("lora").value = name;
        $("lora-scale").value = used[1];
      } else $("lora").value = "";
      $("seed").value = im.seed;
      syncOutputs();
      return;
    }
    if (action === "mix") { addMixItem({ kind: "image", url }); setMode("mix"); return; }
    setMode(action);
    await setImage(action, url);
  }

  // ---------------------------------------------------------------------------------------------- start

  function init() {
    document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => setMode(t.dataset.mode)));
    $("controls").addEventListener("submit", generate);
    $("cancel").addEventListener("click", cancel);
    $("dice").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 32); });
    $("reuse-seed").addEventListener("click", () => { if (state.lastSeed != null) $("seed").value = state.lastSeed; });
    $("guidance").addEventListener("input", syncOutputs);
    $("strength").addEventListener("input", syncOutputs);
    $("key-button").addEventListener("click", () => askKey().then(loadModels));
    $("gallery-clear").addEventListener("click", () => { $("gallery").innerHTML = ""; });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e);
    });
    $("mix-add-prompt").addEventListener("click", () => addMixItem({ kind: "text", text: "" }));
    $("mix-file").addEventListener("change", (e) => { addMixFiles([...e.target.files]); e.target.value = ""; });
    wireDrop("mix-drop", addMixFiles);
    ["img2img", "inpaint", "variations"].forEach(wireSingle);
    wireBrush();
    renderMix();
    syncOutputs();
    setMode("txt2img");
    loadModels();
  }

  init();
})();

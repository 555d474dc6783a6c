// The model's page: a pad, uploads, and the model's answer with its reasons, in words that
// follow the chosen model (digits or photographs, its size and colours).
// Plain browser JavaScript, no libraries, so the page works offline.
"use strict";

(() => {
  const TOKEN_KEY = "image-logreg-token";
  const DEBOUNCE_MS = 150;
  const TOP_K = 3;
  const PAPER = "#ffffff";
  const INK = "#111111";
  // MNIST digits fill a 20-pixel box with strokes 2-3 pixels wide: about 1/11 of the pad's side
  // for a digit drawn most of the pad's height.
  const PEN_FRACTION = 1 / 11;
  const TIMES = "\u00d7";
  // preprocessing.image_files name of models whose files are resized as their dataset's were;
  // any other name is a digit-style model, whose files are normalised as MNIST digits.
  const DATASET_DECODE = "dataset-decode";
  // What the digit-style datasets show: "one" names a single image, "many" the training set.
  // One that can be drawn is asked for by name on the pad.
  const SUBJECTS = {
    mnist: { one: "digit", many: "MNIST digits", drawn: true },
    "emnist-digits": { one: "digit", many: "EMNIST digits", drawn: true },
    "emnist-letters": { one: "letter", many: "EMNIST letters", drawn: true },
    "emnist-balanced": { one: "digit or letter", many: "EMNIST digits and letters", drawn: true },
    kmnist: { one: "character", many: "Kuzushiji-MNIST characters", drawn: true },
    "fashion-mnist": { one: "image", many: "Fashion-MNIST clothes", drawn: false },
  };
  const PHOTOS = { cifar10: "CIFAR-10 photos", cifar100: "CIFAR-100 photos" };
  const RESIZED = {
    fit: (size) => `scaled to fit in ${size} pixels without changing its shape, the gaps filled with its border colour`,
    stretch: (size) => `stretched or squeezed to ${size} pixels`,
    crop: (size) => `scaled to cover ${size} pixels and cut to that around its centre`,
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    pad: $("pad"),
    padFrame: $("pad-frame"),
    padHint: $("pad-hint"),
    clear: $("clear"),
    file: $("file"),
    model: $("model"),
    modelPicker: $("model-picker"),
    resultCard: $("result-card"),
    prediction: $("prediction"),
    confidence: $("confidence"),
    probabilities: $("probabilities"),
    seen: $("seen"),
    evidence: $("evidence"),
    evidenceClass: $("evidence-class"),
    evidenceHow: $("evidence-how"),
    leadInput: $("lead-input"),
    seenHow: $("seen-how"),
    evidenceSum: $("evidence-sum"),
    error: $("error"),
    modelVersion: $("model-version"),
    feedback: $("feedback"),
    feedbackLabel: $("feedback-label"),
    feedbackClasses: $("feedback-classes"),
    feedbackStatus: $("feedback-status"),
    feedbackNotice: $("feedback-notice"),
    tokenForm: $("token-form"),
    token: $("token"),
    tokenLabel: document.querySelector("label[for=token]"),
  };
  const padContext = ui.pad.getContext("2d");
  // The page's own words, for a model whose metadata says too little to describe it.
  const DEFAULT_WORDS = {
    lead: ui.leadInput.textContent,
    seen: ui.seenHow.textContent,
    evidence: ui.evidenceHow.textContent,
    hint: ui.padHint.textContent,
    padLabel: ui.pad.getAttribute("aria-label"),
  };

  const state = {
    models: [], // model metadata from GET /v2/models, in the server's order
    model: null, // the selected model's metadata
    source: null, // what is predicted: "pad", or the File the user gave
    padHasInk: false,
    stroke: null, // the pointer drawing now: {id, x, y}
    seq: 0, // request counter: only the answer to the latest request is shown
    timer: null,
    retry: null, // what to do again once a token has been entered
    answered: false, // an answer about the image now on the pad is shown: it can be corrected
    versions: {}, // model name: the version serving now, as the last correction's answer said
  };

  // ---- talking to the server ------------------------------------------------------------------

  class AuthRequired extends Error {}

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set("Authorization", `Bearer ${token}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch {
      throw new Error("cannot reach the server; is image-logreg serve still running?");
    }
    if (response.status === 401) throw new AuthRequired(await errorMessage(response));
    if (!response.ok) throw new Error(await errorMessage(response));
    return response.json();
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") return body.error;
    } catch {
      // not JSON: fall back to the status line
    }
    return `${response.status} ${response.statusText}`.trim();
  }

  function handleFailure(error, retry) {
    if (error instanceof AuthRequired) {
      askForToken(retry);
    } else {
      showError(error.message);
    }
  }

  // ---- the access token -----------------------------------------------------------------------

  function askForToken(retry) {
    const rejected = sessionStorage.getItem(TOKEN_KEY) !== null;
    sessionStorage.removeItem(TOKEN_KEY);
    state.retry = retry;
    ui.tokenLabel.textContent = rejected
      ? "That token was not accepted. Enter the server's access token:"
      : "This server needs an access token:";
    ui.tokenForm.hidden = false;
    ui.token.focus();
  }

  function submitToken(event) {
    event.preventDefault();
    const token = ui.token.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    ui.token.value = "";
    ui.tokenForm.hidden = true;
    const retry = state.retry;
    state.retry = null;
    if (retry) retry();
  }

  // ---- models ---------------------------------------------------------------------------------

  async function loadModels() {
    let body;
    try {
      body = await api("/v2/models");
    } catch (error) {
      handleFailure(error, loadModels);
      return;
    }
    state.models = body.models || [];
    if (state.models.length === 0) {
      showError("the server has no models");
      return;
    }
    ui.model.replaceChildren(...state.models.map(modelOption));
    // The picker only matters with a choice to make; the select stays in the page for scripts.
    ui.modelPicker.hidden = state.models.length < 2;
    selectModel(state.models[0].name);
  }

  function modelOption(model) {
    const dataset = model.parameters && model.parameters.dataset;
    const label = dataset && dataset !== model.name ? `${model.name} (${dataset})` : model.name;
    return new Option(label, model.name);
  }

  function classesOf(model) {
    return (model.parameters && model.parameters.classes) || [];
  }

  function selectModel(name) {
    state.model = state.models.find((m) => m.name === name) || state.models[0];
    ui.model.value = state.model.name;
    describeModel(state.model);
    buildBars(classesOf(state.model));
    buildCorrections(state.model);
    clearResult();
    if (state.source) predictNow();
  }

  // ---- the words about the model --------------------------------------------------------------

  // The lead, the pad's hint and the captions of the two pictures, as true of this model: what
  // size and colours it takes, and what becomes of an image before it sees it.
  function describeModel(model) {
    const params = model.parameters || {};
    const shape = params.input_shape || [];
    const files = params.image_files || {};
    const [height, width] = shape.slice(-2);
    sizePictures(height, width);
    const words = files.name === DATASET_DECODE
      ? decodedWords(params, files)
      : files.name ? digitWords(params, files) : {};
    const subject = SUBJECTS[params.dataset];
    ui.leadInput.textContent = inputWords(shape, subject ? subject.one : "image");
    ui.seenHow.textContent = words.seen || DEFAULT_WORDS.seen;
    ui.evidenceHow.textContent = words.evidence || DEFAULT_WORDS.evidence;
    const drawn = subject && subject.drawn ? `a ${subject.one} ` : "";
    ui.padHint.textContent = drawn ? `draw ${drawn}here` : DEFAULT_WORDS.hint;
    const padLabel = drawn ? `Drawing pad: draw ${drawn}with the mouse, a finger or a pen` : DEFAULT_WORDS.padLabel;
    ui.pad.setAttribute("aria-label", padLabel);
  }

  // One canvas pixel per input pixel, before the first answer too.
  function sizePictures(height, width) {
    if (!(height > 0 && width > 0)) return;
    for (const canvas of [ui.seen, ui.evidence]) {
      canvas.width = width;
      canvas.height = height;
    }
  }

  function inputWords(shape, one) {
    const count = shape.reduce((a, b) => a * b, 1).toLocaleString("en-US");
    if (shape.length === 3 && shape[0] === 3) {
      const size = sizeWords(shape);
      return `each number of the image (${count} of them for a ${size} colour image: red, green and blue for every pixel)`;
    }
    if (shape.length === 2) return `each pixel of the image (${count} of them for a ${sizeWords(shape)} ${one})`;
    return shape.length ? `each number of the input (${count} of them)` : DEFAULT_WORDS.lead;
  }

  // Height by width, as --image-size is written.
  function sizeWords(shape) {
    return shape.slice(-2).join(TIMES);
  }

  function digitWords(params, files) {
    const subject = SUBJECTS[params.dataset];
    const box = files.box ? `${files.box}${TIMES}${files.box} pixels` : "a box";
    const straightened = params.deskew ? ", its slant straightened" : "";
    return {
      seen: `Your image as the model gets it: turned into white ink on black, cropped, scaled to fit ${box} `
        + `and centred in ${sizeWords(files.image_size || params.input_shape)}${straightened}, `
        + `like the ${subject ? subject.many : "images"} it learned from.`,
      evidence: "Each pixel's ink times the weight the model gives that pixel for its top class.",
    };
  }

  function decodedWords(params, files) {
    const size = sizeWords(files.image_size || params.input_shape);
    const resized = (RESIZED[files.resize] || RESIZED.fit)(size);
    const colour = files.color === "rgb";
    const straightened = params.deskew ? ", its slant straightened" : "";
    const learned = PHOTOS[params.dataset] || "images";
    return {
      seen: `Your image as the model gets it: ${colour ? "kept in colour" : "made gray"}, ${resized}${straightened}, `
        + `like the ${learned} it learned from.`,
      evidence: colour
        ? "Each pixel's red, green and blue values times the weights the model gives them for its top class, added up."
        : "Each pixel's brightness times the weight the model gives that pixel for its top class.",
    };
  }

  // ---- predicting -----------------------------------------------------------------------------

  // While a stroke goes on, ask at most every DEBOUNCE_MS, with the pad as it is by then.
  function schedulePredict() {
    setBusy(true);
    if (state.timer !== null) return;
    state.timer = setTimeout(() => {
      state.timer = null;
      predict();
    }, DEBOUNCE_MS);
  }

  function predictNow() {
    cancelScheduled();
    predict();
  }

  function cancelScheduled() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
  }

  // Any answer still on its way belongs to an image that is gone.
  function forgetPending() {
    cancelScheduled();
    state.seq += 1;
    setBusy(false);
  }

  // aria-busy on the answer says a newer answer is coming: screen readers wait, and so can tests.
  function setBusy(busy) {
    ui.resultCard.setAttribute("aria-busy", String(busy));
  }

  async function predict() {
    const seq = ++state.seq;
    setBusy(true);
    try {
      await requestPrediction(seq);
    } finally {
      if (seq === state.seq && state.timer === null) setBusy(false);
    }
  }

  async function requestPrediction(seq) {
    if (!state.model || !state.source) return;
    const input = await currentInput();
    if (!input || seq !== state.seq) return;
    const params = new URLSearchParams({ model: state.model.name, top_k: String(TOP_K), explain: "true" });
    if (input.name) params.set("filename", input.name);
    try {
      const results = await api(`/predict?${params}`, {
        method: "POST",
        headers: { "Content-Type": input.type },
        body: input.body,
      });
      if (seq !== state.seq) return; // an answer to an older image: a newer request is on its way
      hideCorrectionWords();
      showResult(results[0]);
    } catch (error) {
      if (seq !== state.seq) return;
      clearResult();
      handleFailure(error, predictNow);
    }
  }

  // The bytes to send: an uploaded file as it is, or the pad as a PNG (never a blank pad).
  async function currentInput() {
    if (state.source instanceof File) {
      const file = state.source;
      // Anything not labelled as an image goes as plain bytes, so the server's answer is about
      // the file's contents ("not an image"), not about its label.
      const type = file.type.startsWith("image/") ? file.type : "application/octet-stream";
      return { body: file, type, name: file.name };
    }
    if (!state.padHasInk) return null;
    const blob = await new Promise((resolve) => ui.pad.toBlob(resolve, "image/png"));
    return blob && { body: blob, type: "image/png", name: "drawing.png" };
  }

  // ---- showing the answer ---------------------------------------------------------------------

  function showResult(result) {
    hideError();
    const probabilities = result.probabilities || [];
    const top = result.top_k && result.top_k.length ? result.top_k[0].index : argmax(probabilities);
    const name = result.label ?? classesOf(state.model)[top];
    // A model with a novelty score says when an image is unlike all it learned from: its softmax
    // is then no answer (a linear model is surest far from its data), only a guess.
    const rejected = result.rejected === true;
    setRejected(rejected);
    ui.prediction.textContent = rejected ? notOneOfWords(state.model) : name;
    ui.prediction.dataset.index = String(top);
    const sure = probabilities.length ? percent(probabilities[top]) : "";
    ui.confidence.textContent = rejected
      ? `Its best guess would be ${name}${sure && ` (${sure})`}, but the image looks unlike the ${learnedFrom(state.model)} it learned from.`
      : sure && `${sure} sure`;
    updateBars(probabilities, top);
    if (result.seen) drawSeen(result.seen);
    if (result.evidence) drawEvidence(result.evidence);
    describeEvidence(name, result.evidence, result.bias);
    state.answered = true;
    showCorrections();
  }

  function setRejected(rejected) {
    ui.resultCard.classList.toggle("rejected", rejected);
    if (rejected) {
      ui.prediction.dataset.rejected = "true";
    } else {
      delete ui.prediction.dataset.rejected;
    }
  }

  // "Not a digit?" for a model of things one draws, else about its classes.
  function notOneOfWords(model) {
    const subject = SUBJECTS[(model.parameters || {}).dataset];
    if (subject && subject.drawn) return `Not a ${subject.one}?`;
    const count = classesOf(model).length;
    return count ? `Not one of the ${count} classes?` : "Not one of its classes?";
  }

  function learnedFrom(model) {
    const dataset = (model.parameters || {}).dataset;
    const subject = SUBJECTS[dataset];
    return subject ? subject.many : PHOTOS[dataset] || "images";
  }

  function clearResult() {
    state.answered = false;
    hideCorrections();
    setRejected(false);
    ui.prediction.textContent = "";
    delete ui.prediction.dataset.index;
    ui.confidence.textContent = "";
    updateBars(null, -1);
    for (const canvas of [ui.seen, ui.evidence]) {
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    }
    describeEvidence(null);
  }

  function buildBars(classes) {
    ui.probabilities.replaceChildren(
      ...classes.map((name, index) => {
        const row = document.createElement("li");
        row.className = "bar";
        row.dataset.index = String(index);
        row.innerHTML = '<span class="bar-name"></span><span class="bar-track"><span class="bar-fill"></span></span><span class="bar-value"></span>';
        row.querySelector(".bar-name").textContent = name;
        row.title = name;
        return row;
      })
    );
  }

  // With no probabilities, the bars are emptied and carry no data-probability.
  function updateBars(probabilities, top) {
    for (const row of ui.probabilities.children) {
      const index = Number(row.dataset.index);
      const p = probabilities ? probabilities[index] : undefined;
      row.classList.toggle("top", index === top);
      row.querySelector(".bar-fill").style.width = p === undefined ? "0" : `${(100 * p).toFixed(2)}%`;
      row.querySelector(".bar-value").textContent = p === undefined ? "" : percent(p);
      if (p === undefined) {
        delete row.dataset.probability;
      } else {
        row.dataset.probability = String(p);
      }
    }
  }

  function percent(p) {
    if (p >= 0.9995) return "100%";
    if (p < 0.0005) return p > 0 ? "<0.1%" : "0%";
    return `${(100 * p).toFixed(p < 0.1 ? 1 : 0)}%`;
  }

  function argmax(values) {
    let best = 0;
    values.forEach((v, i) => {
      if (v > values[best]) best = i;
    });
    return best;
  }

  // The image the model saw, as it saw it: white ink on black, one canvas pixel per input pixel.
  // A gray image has one value per pixel; a colour one three (red, green, blue).
  function drawSeen(rows) {
    paintPixels(ui.seen, rows, (v) => (Array.isArray(v) ? v : [v, v, v]));
  }

  // Red pushes towards the top class, blue against it; the scale is symmetric around 0 so white
  // always means "no effect" and equal colours mean equal weight on either side.
  function drawEvidence(rows) {
    const limit = evidenceScale(rows.flat());
    paintPixels(ui.evidence, rows, (v) => diverging(v / limit));
  }

  // Full colour at the 98th percentile of the inked pixels' |evidence|: a few extreme pixels
  // would otherwise wash all the others out to near white.
  function evidenceScale(values) {
    const sizes = values.map(Math.abs).filter((v) => v > 0).sort((a, b) => a - b);
    if (sizes.length === 0) return 1;
    return sizes[Math.min(sizes.length - 1, Math.floor(0.98 * sizes.length))];
  }

  function paintPixels(canvas, rows, colour) {
    const height = rows.length;
    const width = height ? rows[0].length : 0;
    if (!width) return;
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    const image = context.createImageData(width, height);
    rows.forEach((row, y) =>
      row.forEach((value, x) => {
        const [r, g, b] = colour(value);
        image.data.set([r, g, b, 255], 4 * (y * width + x));
      })
    );
    context.putImageData(image, 0, 0);
  }

  // ColorBrewer's RdBu end and middle colours, around pure white at 0.
  const RED = [[255, 255, 255], [244, 165, 130], [178, 24, 43]];
  const BLUE = [[255, 255, 255], [146, 197, 222], [33, 102, 172]];

  function diverging(t) {
    const stops = t >= 0 ? RED : BLUE;
    const s = Math.min(Math.abs(t), 1) * 2;
    const i = Math.min(Math.floor(s), 1);
    const f = s - i;
    return stops[i].map((c, k) => Math.round(c + (stops[i + 1][k] - c) * f));
  }

  function describeEvidence(name, evidence, bias) {
    if (name === null || name === undefined) {
      ui.evidenceClass.textContent = "";
      ui.evidenceSum.textContent = "";
      return;
    }
    ui.evidenceClass.textContent = ` for \u201c${name}\u201d`;
    if (evidence && typeof bias === "number") {
      const total = evidence.flat().reduce((a, b) => a + b, 0);
      // as many decimals as it takes for the three figures to add up as printed
      const digits = [1, 2, 3].find((d) => {
        const round = (v) => Number(v.toFixed(d));
        return Math.abs(round(total) + round(bias) - round(total + bias)) < 0.5 * 10 ** -d;
      }) || 3;
      ui.evidenceSum.textContent = ` (here ${total.toFixed(digits)} ${bias < 0 ? "\u2212" : "+"} ${Math.abs(bias).toFixed(digits)} = ${(total + bias).toFixed(digits)})`;
    } else {
      ui.evidenceSum.textContent = "";
    }
  }

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.textContent = "";
    ui.error.hidden = true;
  }

  // ---- corrections: "It's a ..." ---------------------------------------------------------------

  // A server started with --feedback-dir or --learn takes corrections: the image now on the pad
  // and its right class. With --learn the model learns it at once, as a new version, and the
  // answer it gives then is shown in place of the old one.
  function feedbackOf(model) {
    return (model && model.parameters && model.parameters.feedback) || null;
  }

  function buildCorrections(model) {
    const feedback = feedbackOf(model);
    ui.feedbackClasses.replaceChildren(
      ...(feedback ? classesOf(model) : []).map((name, index) => {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "class-button";
        button.dataset.index = String(index);
        button.textContent = shortName(name);
        button.title = name;
        button.setAttribute("aria-label", `It's ${name}`);
        button.addEventListener("click", () => sendCorrection(index));
        return button;
      })
    );
    const live = state.versions[model.name] || model.versions[model.versions.length - 1];
    showVersion(feedback && feedback.learn ? live : null);
  }

  // MNIST's classes are "0 - zero" ... "9 - nine": a button shows the digit.
  function shortName(name) {
    const head = name.split(" - ")[0];
    return head && head !== name && head.length <= 3 ? head : name;
  }

  function showVersion(version) {
    ui.modelVersion.hidden = version === null;
    ui.modelVersion.textContent = version === null ? "" : `version ${version}`;
    ui.modelVersion.dataset.version = version === null ? "" : version;
  }

  function showCorrections() {
    ui.feedback.hidden = !(feedbackOf(state.model) && state.answered);
    // "Not a digit?" is a question: the buttons answer it
    ui.feedbackLabel.textContent = ui.resultCard.classList.contains("rejected") ? "It's a" : "Wrong? It's a";
  }

  function hideCorrections() {
    ui.feedback.hidden = true;
    setCorrectionBusy(false);
    hideCorrectionWords();
    ui.feedbackNotice.textContent = "";
    ui.feedbackNotice.hidden = true;
  }

  // What was said about the last correction belongs to its image; a rollback notice stays.
  function hideCorrectionWords() {
    ui.feedbackStatus.textContent = "";
    ui.feedbackStatus.hidden = true;
    delete ui.feedbackStatus.dataset.stored;
    delete ui.feedbackStatus.dataset.version;
  }

  function setCorrectionBusy(busy) {
    ui.feedback.setAttribute("aria-busy", String(busy));
    for (const button of ui.feedbackClasses.children) button.disabled = busy;
  }

  async function sendCorrection(index) {
    const seq = state.seq; // the answer being corrected; a newer drawing makes it stale
    const input = await currentInput();
    if (!input || !state.model) return;
    const model = state.model;
    setCorrectionBusy(true);
    const params = new URLSearchParams({ label: String(index), top_k: String(TOP_K), explain: "true" });
    if (input.name) params.set("filename", input.name);
    try {
      const body = await api(`/v2/models/${encodeURIComponent(model.name)}/feedback?${params}`, {
        method: "POST",
        headers: { "Content-Type": input.type },
        body: input.body,
      });
      if (body.learning) state.versions[model.name] = body.model_version;
      if (model !== state.model) return;
      if (body.learning) showVersion(body.model_version);
      if (seq !== state.seq) return; // stored, but the pad holds another image now
      showResult(body.result); // the new answer, from the version that learnt it
      showCorrected(body);
    } catch (error) {
      handleFailure(error, () => sendCorrection(index));
    } finally {
      setCorrectionBusy(false);
    }
  }

  function showCorrected(body) {
    const name = shortName(body.label);
    let words = `Stored as ${name} (${body.stored}).`;
    if (!body.learning) {
      words += " This server keeps corrections for a later run (image-logreg learn) and does not learn them now.";
    } else if (body.rolled_back) {
      words += ` The model reads it as ${shortName(body.result.label)} now.`;
    } else if (body.steps === 0) {
      words += ` The model already reads it as ${name}: nothing to learn (version ${body.model_version}).`;
    } else if (body.answered) {
      words += ` Learnt: version ${body.model_version} reads it as ${name}.`;
    } else {
      words += ` Learnt as far as one correction may move the model: version ${body.model_version} still reads it as ${shortName(body.result.label)}.`;
    }
    ui.feedbackStatus.textContent = words;
    ui.feedbackStatus.dataset.stored = body.stored;
    ui.feedbackStatus.dataset.version = body.model_version;
    ui.feedbackStatus.hidden = false;
    const back = body.rolled_back;
    ui.feedbackNotice.hidden = !back;
    ui.feedbackNotice.textContent = back
      ? `After these corrections the model's test accuracy fell to ${percentOf(back.accuracy)}, more than ${back.max_drop} `
        + `point${back.max_drop === 1 ? "" : "s"} below the original's ${percentOf(back.baseline)}: `
        + `it went back from version ${back.from} to version ${back.to}.`
      : "";
  }

  function percentOf(accuracy) {
    return `${(100 * accuracy).toFixed(1)}%`;
  }

  // ---- the drawing pad ------------------------------------------------------------------------

  function resetPad() {
    padContext.fillStyle = PAPER;
    padContext.fillRect(0, 0, ui.pad.width, ui.pad.height);
    setPadHasInk(false);
  }

  function setPadHasInk(hasInk) {
    state.padHasInk = hasInk;
    ui.padHint.hidden = hasInk;
  }

  // Pointer position in canvas pixels, whatever size the pad is shown at.
  function padPoint(event) {
    const box = ui.pad.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * ui.pad.width) / box.width,
      y: ((event.clientY - box.top) * ui.pad.height) / box.height,
    };
  }

  function penWidth() {
    return ui.pad.width * PEN_FRACTION;
  }

  function startStroke(event) {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    if (state.stroke) return; // a second finger does not start a second line
    event.preventDefault();
    ui.pad.setPointerCapture(event.pointerId);
    const point = padPoint(event);
    state.stroke = { id: event.pointerId, ...point };
    // A tap leaves a dot, as a pen on paper would.
    padContext.fillStyle = INK;
    padContext.beginPath();
    padContext.arc(point.x, point.y, penWidth() / 2, 0, 2 * Math.PI);
    padContext.fill();
    state.source = "pad";
    setPadHasInk(true);
    schedulePredict();
  }

  function continueStroke(event) {
    const stroke = state.stroke;
    if (!stroke || stroke.id !== event.pointerId) return;
    event.preventDefault();
    // Coalesced events hold the points between frames: fast strokes stay smooth.
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    padContext.strokeStyle = INK;
    padContext.lineWidth = penWidth();
    padContext.lineCap = "round";
    padContext.lineJoin = "round";
    padContext.beginPath();
    padContext.moveTo(stroke.x, stroke.y);
    for (const e of events.length ? events : [event]) {
      const point = padPoint(e);
      padContext.lineTo(point.x, point.y);
      stroke.x = point.x;
      stroke.y = point.y;
    }
    padContext.stroke();
    schedulePredict();
  }

  function endStroke(event) {
    if (!state.stroke || state.stroke.id !== event.pointerId) return;
    state.stroke = null;
    predictNow();
  }

  function clearAll() {
    forgetPending();
    state.source = null;
    state.stroke = null;
    resetPad();
    clearResult();
    hideError();
    ui.file.value = ""; // so choosing the same file again still counts as a change
  }

  // ---- image files: upload, drag and drop, paste ----------------------------------------------

  async function useFile(file) {
    if (!file) return;
    forgetPending();
    setBusy(true); // an answer for this file is coming, once it is on the pad
    state.source = file;
    await showFileOnPad(file);
    if (state.source === file) predictNow();
  }

  // The picture goes on the pad so the user sees what was sent, and can draw over it.
  async function showFileOnPad(file) {
    resetPad();
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch {
      return; // not something the browser can show; the server will say what is wrong with it
    }
    const side = ui.pad.width;
    const scale = Math.min(side / bitmap.width, side / bitmap.height);
    const w = bitmap.width * scale;
    const h = bitmap.height * scale;
    padContext.drawImage(bitmap, (side - w) / 2, (side - h) / 2, w, h);
    bitmap.close();
    setPadHasInk(true);
  }

  function imageFileIn(transfer) {
    if (!transfer) return null;
    const files = Array.from(transfer.files || []);
    return files.find((f) => f.type.startsWith("image/")) || files[0] || null;
  }

  function onDragOver(event) {
    if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
    event.preventDefault(); // allows the drop, and keeps the browser from opening the file itself
    event.dataTransfer.dropEffect = "copy";
    ui.padFrame.classList.add("dragging");
  }

  function onDragLeave(event) {
    if (event.relatedTarget === null) ui.padFrame.classList.remove("dragging");
  }

  function onDrop(event) {
    ui.padFrame.classList.remove("dragging");
    const file = imageFileIn(event.dataTransfer);
    if (!file) return;
    event.preventDefault();
    useFile(file);
  }

  function onPaste(event) {
    const file = imageFileIn(event.clipboardData);
    if (!file) return; // text pasted into the token field goes its usual way
    event.preventDefault();
    useFile(file);
  }

  // ---- start ----------------------------------------------------------------------------------

  function start() {
    resetPad();
    ui.pad.addEventListener("pointerdown", startStroke);
    ui.pad.addEventListener("pointermove", continueStroke);
    ui.pad.addEventListener("pointerup", endStroke);
    ui.pad.addEventListener("pointercancel", endStroke);
    ui.pad.addEventListener("lostpointercapture", endStroke);
    ui.clear.addEventListener("click", clearAll);
    ui.file.addEventListener("change", () => useFile(ui.file.files[0]));
    ui.model.addEventListener("change", () => selectModel(ui.model.value));
    ui.tokenForm.addEventListener("submit", submitToken);
    document.addEventListener("dragover", onDragOver);
    document.addEventListener("dragleave", onDragLeave);
    document.addEventListener("drop", onDrop);
    document.addEventListener("paste", onPaste);
    loadModels();
  }

  start();
})();

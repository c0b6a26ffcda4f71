// EchoX web page: one WebSocket conversation (/v1/stream, see docs/api.md). The question goes
// up as it is recorded (16-bit PCM chunks) or as a file or text; the answer's text is shown as
// it streams and its audio is played chunk by chunk with Web Audio, from the first chunk on.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), model: $("model"), history: $("history"), empty: $("empty"),
    notice: $("notice"), noticeText: $("notice-text"), retry: $("retry"),
    noticeClose: $("notice-close"), tokenForm: $("token-form"), token: $("token"),
    record: $("record"), upload: $("upload"), ask: $("ask"), text: $("text"), send: $("send"),
    cancel: $("cancel"), reset: $("reset"), recording: $("recording"), recTime: $("rec-time"),
  };
  const S = {
    ws: null, ready: null, connecting: null, token: sessionStorage.getItem("echox-token") || "",
    busy: false, turn: null, header: null, ctx: null, workletLoaded: false, playNext: 0,
    sources: new Set(), rec: null, lastInput: null, turnsDone: 0,
  };
  window.echox = S; // for people poking around in the console (and the browser test)

  // ------------------------------------------------------------------ connection

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text || state;
  }

  function connect() {
    if (S.ws && S.ws.readyState === WebSocket.OPEN && S.ready) return Promise.resolve();
    if (S.connecting) return S.connecting;
    const url = new URL("/v1/stream", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    // the token travels as a subprotocol (browsers cannot set headers on a WebSocket)
    let ws;
    try {
      ws = new WebSocket(url, S.token ? ["echox", "bearer." + S.token] : ["echox"]);
    } catch {
      url.searchParams.set("token", S.token); // characters a subprotocol cannot carry
      ws = new WebSocket(url, ["echox"]);
    }
    ws.binaryType = "arraybuffer";
    S.ws = ws;
    S.ready = null;
    setStatus("connecting");
    S.connecting = new Promise((resolve, reject) => {
      ws.onmessage = (ev) => onMessage(ev, resolve);
      ws.onclose = (ev) => { onClose(ws, ev); reject(new Error("the connection closed")); };
    });
    setControls(); // nothing is sent while connecting
    // once settled, the controls follow: a failed reconnect left them all disabled for good
    S.connecting.catch(() => {}).finally(() => { S.connecting = null; setControls(); });
    return S.connecting;
  }

  function send(msg) {
    S.ws.send(typeof msg === "string" || msg instanceof ArrayBuffer ? msg : JSON.stringify(msg));
  }

  function onClose(ws, ev) {
    if (ws !== S.ws) return;
    S.ready = null;
    if (S.rec) abortRecording();
    if (S.busy) failTurn("the connection was lost");
    setStatus("closed", "disconnected");
    setControls();
    if (!ui.notice.hidden) return; // an error already says why
    showNotice(`Disconnected from the server${ev.reason ? ": " + ev.reason : ""}. ` +
               "It reconnects when you ask the next question.");
  }

  function onMessage(ev, resolveReady) {
    if (ev.data instanceof ArrayBuffer) {
      const header = S.header;
      S.header = null;
      if (header && S.turn) playChunk(S.turn, header, ev.data);
      return;
    }
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    const turn = S.turn;
    switch (msg.type) {
      case "ready":
        S.ready = msg;
        ui.model.textContent = `${msg.model}` +
          (msg.audio_output ? ` · speech ${msg.sample_rate / 1000} kHz` : " · text answers only");
        ui.text.maxLength = msg.limits.max_text_chars;
        setStatus("ready");
        ui.tokenForm.hidden = true;
        setControls();
        resolveReady();
        break;
      case "queued":
        setStatus("queued", `queued (${msg.position} ahead)`);
        if (turn) turn.note.textContent = `waiting for a free worker (${msg.position} ahead)…`;
        break;
      case "start":
        setStatus("answering");
        if (turn) turn.note.textContent = "";
        break;
      case "text":
        if (turn) {
          turn.textEl.textContent += msg.text;
          if (turn.firstTextMs === null) turn.firstTextMs = performance.now() - turn.sentAt;
          scrollDown();
        }
        break;
      case "audio":
        S.header = msg;
        break;
      case "final":
        if (turn) finishTurn(turn, msg);
        break;
      case "cancelled":
        if (turn) endTurn(turn, "cancelled", "stopped");
        break;
      case "reset":
        ui.history.replaceChildren();
        ui.empty.hidden = false;
        break;
      case "error":
        onError(msg);
        break;
      default:
        break; // "segment", "pong": nothing to show
    }
  }

  function onError(msg) {
    if (msg.status === 401) {
      ui.tokenForm.hidden = false;
      ui.token.focus();
    }
    let text = `${msg.message} (${msg.status} ${msg.code})`;
    const retry = S.lastInput && (msg.status === 503 || msg.status === 504);
    if (msg.status === 503) { // the server's message says "the server is busy: ..." itself
      const m = msg.message.replace(/^the server is busy:?\s*/i, "");
      text = `The server is busy: ${m}.`;
    }
    showNotice(text, retry ? msg.retry_after || 1 : null);
    if (S.rec) abortRecording();
    // a 409 answers a message sent while a turn runs: that turn goes on
    if (S.busy && msg.status !== 409) {
      failTurn(msg.status === 503 ? "not answered: the server was busy" : msg.message);
    }
    if (S.ready) setStatus("ready");
  }

  // ------------------------------------------------------------------ notices

  let retryTimer = null;
  function showNotice(text, retryAfter = null) {
    ui.noticeText.textContent = text;
    ui.notice.hidden = false;
    clearInterval(retryTimer);
    ui.retry.hidden = retryAfter === null;
    if (retryAfter !== null) {
      let left = Math.max(0, Math.ceil(retryAfter));
      const tick = () => {
        ui.retry.disabled = left > 0;
        ui.retry.textContent = left > 0 ? `Retry in ${left} s` : "Retry";
        if (left-- <= 0) clearInterval(retryTimer);
      };
      tick();
      retryTimer = setInterval(tick, 1000);
    }
  }
  function hideNotice() { ui.notice.hidden = true; clearInterval(retryTimer); }

  // ------------------------------------------------------------------ turns

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function audioElement(url) {
    const a = el("audio");
    a.controls = true;
    a.preload = "metadata";
    a.src = url;
    return a;
  }

  function scrollDown() { window.scrollTo(0, document.body.scrollHeight); }

  function newTurn(userText, userAudioUrl, sentAt = performance.now()) {
    ui.empty.hidden = true;
    const u = el("li", "turn user");
    u.append(el("div", "who", "You"), el("div", "text", userText));
    if (userAudioUrl) u.append(audioElement(userAudioUrl));
    const a = el("li", "turn assistant");
    a.dataset.state = "answering";
    const who = el("div", "who", "EchoX");
    const play = el("span", "playback");
    who.append(play);
    const textEl = el("div", "text");
    const note = el("div", "stats");
    a.append(who, textEl, note);
    ui.history.append(u, a);
    scrollDown();
    const turn = { el: a, textEl, note, play, chunks: [], rate: 16000, sentAt,
                   firstTextMs: null, firstAudioMs: null, playing: false };
    S.turn = turn;
    S.busy = true;
    hideNotice();
    setControls();
    return turn;
  }

  function endTurn(turn, state, note) {
    turn.el.dataset.state = state;
    if (note !== undefined) turn.note.textContent = note;
    if (turn.chunks.length) {
      turn.el.insertBefore(audioElement(URL.createObjectURL(wavBlob(turn.chunks, turn.rate))),
                           turn.note);
    }
    S.turn = null;
    S.busy = false;
    S.header = null;
    if (S.ready) setStatus("ready");
    setControls();
  }

  function finishTurn(turn, msg) {
    const s = msg.stats;
    const ms = (v) => (v === null || v === undefined ? "–" : `${Math.round(v)} ms`);
    turn.textEl.textContent = msg.text;
    $("announce").textContent = `answer: ${msg.text}`;
    const parts = [`first text ${ms(s.first_text_ms)}`, `first audio ${ms(s.first_audio_ms)}`,
                   `total ${(s.total_ms / 1000).toFixed(1)} s`,
                   `speech ${msg.audio_seconds.toFixed(1)} s`];
    if (s.rtf !== null) parts.push(`RTF ${s.rtf.toFixed(2)}`);
    if (s.queue_ms > 50) parts.push(`queued ${ms(s.queue_ms)}`);
    S.turnsDone += 1;
    turn.el.dataset.finalMs = Math.round(performance.now() - turn.sentAt);
    endTurn(turn, "done", parts.join(" · "));
  }

  function failTurn(reason) {
    const turn = S.turn;
    if (!turn) { S.busy = false; setControls(); return; }
    turn.el.classList.add("failed");
    endTurn(turn, "failed", reason);
  }

  // ------------------------------------------------------------------ playback

  function audioContext() {
    if (!S.ctx) S.ctx = new AudioContext();
    if (S.ctx.state === "suspended") S.ctx.resume();
    return S.ctx;
  }

  function playChunk(turn, header, buf) {
    const pcm = new Int16Array(buf);
    if (!pcm.length) return;
    turn.chunks.push(pcm);
    turn.rate = header.sample_rate;
    const ctx = audioContext();
    const f = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
    const buffer = ctx.createBuffer(1, f.length, header.sample_rate);
    buffer.copyToChannel(f, 0);
    const src = ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(ctx.destination);
    const at = Math.max(ctx.currentTime + 0.03, S.playNext);
    src.start(at);
    S.playNext = at + buffer.duration;
    S.sources.add(src);
    src.onended = () => S.sources.delete(src);
    if (turn.firstAudioMs === null) {
      turn.firstAudioMs = performance.now() - turn.sentAt;
      turn.el.dataset.firstAudioMs = Math.round(turn.firstAudioMs);
      turn.play.textContent = " · audio arriving…";
      const check = () => {
        if (ctx.state === "running" && ctx.currentTime >= at) {
          turn.playing = true;
          turn.el.dataset.playback = "started";
          turn.el.dataset.playbackStartedWhile = turn.el.dataset.state; // "answering": streamed
          turn.play.textContent = ` · ▶ speaking (first audio ${Math.round(turn.firstAudioMs)} ms)`;
        } else {
          if (ctx.state !== "running") turn.play.textContent = " · click anywhere to allow sound";
          setTimeout(check, 20);
        }
      };
      check();
    }
  }

  function stopPlayback() {
    for (const s of S.sources) { try { s.stop(); } catch { /* already stopped */ } }
    S.sources.clear();
    S.playNext = 0;
  }

  function wavBlob(chunks, rate) {
    const n = chunks.reduce((k, c) => k + c.length, 0);
    const buf = new ArrayBuffer(44 + 2 * n);
    const v = new DataView(buf);
    const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
    str(0, "RIFF"); v.setUint32(4, 36 + 2 * n, true); str(8, "WAVE"); str(12, "fmt ");
    v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
    v.setUint32(24, rate, true); v.setUint32(28, 2 * rate, true); v.setUint16(32, 2, true);
    v.setUint16(34, 16, true); str(36, "data"); v.setUint32(40, 2 * n, true);
    let o = 44;
    for (const c of chunks) for (let i = 0; i < c.length; i++, o += 2) v.setInt16(o, c[i], true);
    return new Blob([buf], { type: "audio/wav" });
  }

  // ------------------------------------------------------------------ asking

  async function ready() {
    audioContext(); // made during the click: browsers allow sound after a user gesture
    await connect();
  }

  function toInt16(f) {
    const out = new Int16Array(f.length);
    for (let i = 0; i < f.length; i++) {
      const x = Math.max(-1, Math.min(1, f[i]));
      out[i] = x < 0 ? x * 32768 : x * 32767;
    }
    return out;
  }

  async function startRecording() {
    if (S.recStarting) return; // a double click opened two microphones, one never closed
    S.recStarting = true;
    ui.record.disabled = true;
    try {
      await ready();
      const ctx = audioContext();
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error("this browser gives no microphone access here (it needs https or localhost)");
      }
      const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
      if (!S.workletLoaded) {
        await ctx.audioWorklet.addModule("/static/recorder.js");
        S.workletLoaded = true;
      }
      const source = ctx.createMediaStreamSource(stream);
      const node = new AudioWorkletNode(ctx, "echox-recorder");
      const rate = ctx.sampleRate;
      const maxSeconds = S.ready.limits.max_audio_seconds;
      const rec = { stream, source, node, rate, chunks: [], pending: [], pendingLen: 0,
                    samples: 0 };
      S.rec = rec;
      send({ type: "audio", format: "pcm_s16le", sample_rate: rate });
      node.port.onmessage = (e) => {
        if (S.rec !== rec) return;
        rec.pending.push(e.data);
        rec.pendingLen += e.data.length;
        if (rec.pendingLen >= rate / 10) flush(rec); // ~100 ms per frame
        ui.recTime.textContent = (rec.samples / rate).toFixed(1);
        if ((rec.samples + rec.pendingLen) / rate >= maxSeconds - 0.1) stopRecording();
      };
      source.connect(node);
      node.connect(ctx.destination); // it outputs silence; connected so that it is pulled
      ui.record.dataset.recording = "true";
      ui.record.textContent = "■ Stop";
      ui.recording.hidden = false;
      hideNotice();
    } catch (err) {
      abortRecording();
      showNotice(`Cannot record: ${err.message || err}`);
    } finally {
      S.recStarting = false;
      setControls();
    }
  }

  function flush(rec) {
    if (!rec.pendingLen) return;
    const f = new Float32Array(rec.pendingLen);
    let o = 0;
    for (const p of rec.pending) { f.set(p, o); o += p.length; }
    rec.pending = [];
    rec.pendingLen = 0;
    const pcm = toInt16(f);
    rec.chunks.push(pcm);
    rec.samples += pcm.length;
    send(pcm.buffer);
  }

  function releaseRecorder(rec) {
    try { rec.source.disconnect(); rec.node.disconnect(); } catch { /* gone */ }
    rec.stream.getTracks().forEach((t) => t.stop());
    ui.record.dataset.recording = "false";
    ui.record.textContent = "● Record";
    ui.recording.hidden = true;
  }

  function abortRecording() {
    const rec = S.rec;
    S.rec = null;
    if (rec) releaseRecorder(rec);
    setControls();
  }

  function stopRecording() {
    const rec = S.rec;
    if (!rec) return;
    flush(rec);
    S.rec = null;
    releaseRecorder(rec);
    if (!rec.samples) {
      send({ type: "cancel" });
      showNotice("Nothing was recorded (no microphone input).");
      setControls();
      return;
    }
    send({ type: "end" });
    const sentAt = performance.now(); // latency counts from here, not after the wav is made
    S.lastInput = { kind: "pcm", rate: rec.rate, chunks: rec.chunks };
    newTurn(`Recorded question (${(rec.samples / rec.rate).toFixed(1)} s)`,
            URL.createObjectURL(wavBlob(rec.chunks, rec.rate)), sentAt);
  }

  async function sendFile(file) {
    try {
      await ready();
    } catch {
      return;
    }
    const limit = S.ready.limits.max_upload_bytes;
    if (file.size > limit) {
      showNotice(`${file.name} is ${file.size} bytes; the server takes at most ${limit}.`);
      return;
    }
    const buf = await file.arrayBuffer();
    const playable = /^audio\//.test(file.type) || /\.(wav|flac|ogg)$/i.test(file.name);
    S.lastInput = { kind: "file", buf, name: file.name, playable };
    sendInput(S.lastInput);
  }

  function sendInput(input) {
    S.sentAt = performance.now();
    if (input.kind === "text") {
      send({ type: "text", text: input.text });
      newTurn(input.text, null);
    } else if (input.kind === "file") {
      send({ type: "audio", format: "file" });
      send(input.buf);
      send({ type: "end" });
      newTurn(`File: ${input.name}`,
              input.playable ? URL.createObjectURL(new Blob([input.buf])) : null);
    } else {
      send({ type: "audio", format: "pcm_s16le", sample_rate: input.rate });
      for (const c of input.chunks) send(c.buffer);
      send({ type: "end" });
      const sentAt = performance.now();
      const n = input.chunks.reduce((k, c) => k + c.length, 0);
      newTurn(`Recorded question (${(n / input.rate).toFixed(1)} s, sent again)`,
              URL.createObjectURL(wavBlob(input.chunks, input.rate)), sentAt);
    }
  }

  function setControls() {
    const open = !!S.ready;
    const idle = open && !S.busy;
    ui.record.disabled = !(S.rec || idle) || !!S.recStarting;
    ui.upload.disabled = !idle || !!S.rec;
    ui.text.disabled = !idle || !!S.rec;
    ui.send.disabled = !idle || !!S.rec;
    ui.reset.disabled = !idle || !!S.rec;
    ui.cancel.hidden = !S.busy;
    if (!open && !S.connecting && !S.busy && !S.recStarting) { // closed: any action reconnects
      ui.record.disabled = ui.upload.disabled = ui.text.disabled = ui.send.disabled = false;
    }
  }

  // ------------------------------------------------------------------ wiring

  ui.record.addEventListener("click", () => (S.rec ? stopRecording() : startRecording()));
  ui.upload.addEventListener("change", () => {
    const file = ui.upload.files[0];
    ui.upload.value = "";
    if (file) sendFile(file);
  });
  ui.ask.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = ui.text.value.trim();
    if (!text || S.asking || S.busy) return; // one turn per submit (a double click sent two)
    S.asking = true;
    try {
      try { await ready(); } catch { return; }
      if (S.busy) return;
      ui.text.value = "";
      S.lastInput = { kind: "text", text };
      sendInput(S.lastInput);
    } finally {
      S.asking = false;
    }
  });
  ui.cancel.addEventListener("click", () => {
    // Stop appears where Send was: the second click of a double click on Send is not a stop
    if (performance.now() - (S.sentAt || 0) < 600) return;
    stopPlayback();
    if (S.ws && S.ws.readyState === WebSocket.OPEN) send({ type: "cancel" });
  });
  ui.reset.addEventListener("click", () => { stopPlayback(); send({ type: "reset" }); });
  ui.retry.addEventListener("click", async () => {
    hideNotice();
    if (!S.lastInput) return;
    try { await ready(); } catch { return; }
    if (!S.busy) sendInput(S.lastInput);
  });
  ui.noticeClose.addEventListener("click", hideNotice);
  ui.tokenForm.addEventListener("submit", (e) => {
    e.preventDefault();
    S.token = ui.token.value.trim();
    sessionStorage.setItem("echox-token", S.token);
    hideNotice();
    if (S.ws) S.ws.close();
    S.ws = null;
    connect().catch(() => {});
  });
  document.addEventListener("click", () => { if (S.ctx && S.ctx.state === "suspended") S.ctx.resume(); });

  connect().catch(() => {});
})();

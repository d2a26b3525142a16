// omni's page: talk to the model over the Realtime WebSocket (/v1/realtime), from the browser's microphone.
// No build step, no dependencies. The key (if the server needs one) comes from this page's URL: /?key=KEY.

const params = new URLSearchParams(location.search);
const key = params.get("key");
const keyQuery = key ? `?key=${encodeURIComponent(key)}` : "";
const CAPTURE = params.has("capture"); // record what the page plays (tests, and checking the playback)
const RATE = 24000; // PCM16 at 24 kHz both ways, as the Realtime API's audio/pcm
const VOICED_RMS = 0.01; // about -40 dBFS: a chunk this loud counts as voiced for the latency fallback

const $ = (id) => document.getElementById(id);
const page = {
  ws: null,
  ctx: null,
  stream: null,
  mic: null,
  talking: false,
  sentMs: 0, // audio sent in this session, ms
  sendLog: [], // [end of chunk in session ms, performance.now() when sent], recent chunks
  lastVoicedT: null,
  voicedEndT: null, // when the chunk holding the server's audio_end_ms was sent
  events: {}, // server event type -> count
  appended: 0, // input_audio_buffer.append messages sent
  captured: [], // Float32Array blocks the tap recorded
  play: { gain: null, next: 0, sources: [], item: null, firstStart: null, scheduledMs: 0 },
  reply: null, // { itemId, el, textEl, latencyShown }
};
window.omniPage = page;

function status(text) { $("status").textContent = text; }

function showError(text) {
  const el = $("error");
  el.textContent = text;
  el.hidden = false;
}

function base64FromBytes(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function floatsFromBase64(b64) {
  const raw = atob(b64);
  const n = raw.length >> 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let v = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
    if (v >= 0x8000) v -= 0x10000;
    out[i] = v / 32768;
  }
  return out;
}

function send(event) {
  if (page.ws && page.ws.readyState === WebSocket.OPEN) page.ws.send(JSON.stringify(event));
}

// -- the connection --------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  // Browsers cannot set headers on a WebSocket: the key travels as a subprotocol, as in OpenAI's browser clients.
  const protocols = ["realtime"];
  if (key) protocols.push(`openai-insecure-api-key.${key}`);
  const ws = new WebSocket(`${scheme}//${location.host}/v1/realtime`, protocols);
  page.ws = ws;
  ws.onopen = () => {
    status("connected");
    send({
      type: "session.update",
      session: {
        type: "realtime",
        audio: {
          input: { format: { type: "audio/pcm", rate: RATE }, turn_detection: { type: "server_vad", silence_duration_ms: 500, prefix_padding_ms: 300 } },
          output: { format: { type: "audio/pcm", rate: RATE } },
        },
      },
    });
  };
  ws.onmessage = (message) => {
    let event;
    try { event = JSON.parse(message.data); } catch { return; }
    page.events[event.type] = (page.events[event.type] || 0) + 1;
    handle(event);
  };
  ws.onclose = (e) => {
    status(e.code === 1008 ? `refused: ${e.reason || "not allowed"}` : "not connected");
    if (page.talking) stop();
  };
}

// -- the server's events ---------------------------------------------------------------------

function handle(event) {
  switch (event.type) {
    case "input_audio_buffer.speech_started":
      interrupt(); // speaking over a reply stops it here at once
      status("listening");
      break;
    case "input_audio_buffer.speech_stopped":
      page.voicedEndT = sentTimeOf(event.audio_end_ms);
      status("thinking");
      break;
    case "input_audio_buffer.committed":
      addTurn("user", "(you spoke)");
      break;
    case "omni.response.waiting":
      status(`waiting for the model (${event.replies_ahead} ahead)`);
      break;
    case "response.output_item.added":
      startReply(event.item.id);
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (page.reply) page.reply.textEl.textContent += event.delta;
      break;
    case "response.output_audio.delta":
      playDelta(event.item_id, event.delta);
      break;
    case "response.done":
      if (page.reply && event.response.status !== "completed") page.reply.el.classList.add("cut");
      status("listening");
      break;
    case "error":
      showError(event.error.message);
      break;
  }
}

function addTurn(kind, text) {
  const li = document.createElement("li");
  li.className = kind;
  const textEl = document.createElement("span");
  textEl.className = "text";
  textEl.textContent = text;
  li.appendChild(textEl);
  $("turns").appendChild(li);
  return { el: li, textEl };
}

function startReply(itemId) {
  const turn = addTurn("assistant", "");
  page.reply = { itemId, ...turn, latencyShown: false };
  status("speaking");
}

// When the chunk holding `audioEndMs` of the session's audio was sent (the last voiced audio, by the server's VAD).
function sentTimeOf(audioEndMs) {
  for (const [endMs, t] of page.sendLog) if (endMs >= audioEndMs) return t;
  return page.lastVoicedT;
}

// -- playback: deltas scheduled back to back, so the reply plays without gaps ----------------

function playDelta(itemId, b64) {
  const samples = floatsFromBase64(b64);
  if (!samples.length || !page.ctx) return;
  const now = performance.now();
  if (page.reply && !page.reply.latencyShown) {
    page.reply.latencyShown = true;
    const from = page.voicedEndT ?? page.lastVoicedT;
    if (from !== null) {
      const ms = Math.round(now - from);
      page.lastLatencyMs = ms;
      const el = document.createElement("span");
      el.className = "latency";
      el.textContent = `latency ${ms} ms (your last word sent → first audio received)`;
      page.reply.el.appendChild(el);
    }
  }
  const ctx = page.ctx;
  const play = page.play;
  if (play.item !== itemId) {
    play.item = itemId;
    play.firstStart = null;
    play.scheduledMs = 0;
  }
  const buffer = ctx.createBuffer(1, samples.length, RATE);
  buffer.copyToChannel(samples, 0);
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(play.gain);
  const start = Math.max(play.next, ctx.currentTime + 0.05);
  source.start(start);
  if (play.firstStart === null) play.firstStart = start;
  play.next = start + buffer.duration;
  play.scheduledMs += buffer.duration * 1000;
  play.sources.push(source);
  source.onended = () => { play.sources = play.sources.filter((s) => s !== source); };
}

// Speech over the reply: silence it now, and tell the server how much was actually heard.
function interrupt() {
  const play = page.play;
  if (!page.ctx || play.item === null || play.sources.length === 0) return;
  const heardMs = Math.max(0, Math.min(play.scheduledMs, (page.ctx.currentTime - play.firstStart) * 1000));
  for (const source of play.sources) { try { source.stop(); } catch { /* already ended */ } }
  play.sources = [];
  play.next = 0;
  send({ type: "conversation.item.truncate", item_id: play.item, content_index: 0, audio_end_ms: Math.floor(heardMs) });
  if (page.reply) page.reply.el.classList.add("cut");
  play.item = null;
}

// -- the microphone --------------------------------------------------------------------------

async function start() {
  $("error").hidden = true;
  const ctx = new AudioContext({ latencyHint: "interactive" });
  page.ctx = ctx;
  await ctx.audioWorklet.addModule(`/page/mic-worklet.js${keyQuery}`);
  page.stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  });
  const silent = ctx.createGain();
  silent.gain.value = 0;
  silent.connect(ctx.destination);
  page.play.gain = ctx.createGain();
  page.play.gain.connect(ctx.destination);
  if (CAPTURE) {
    const tap = new AudioWorkletNode(ctx, "playback-tap");
    tap.port.onmessage = (e) => page.captured.push(e.data);
    page.play.gain.connect(tap);
    tap.connect(silent);
  }
  page.mic = new AudioWorkletNode(ctx, "mic-pcm16", { processorOptions: { targetRate: RATE, chunkMs: 40 } });
  page.mic.port.onmessage = (e) => sendAudio(e.data.pcm, e.data.rms);
  ctx.createMediaStreamSource(page.stream).connect(page.mic);
  page.mic.connect(silent); // keeps the worklet pulled in every browser
  connect();
  page.talking = true;
  $("talk").textContent = "Stop";
  $("talk").classList.add("on");
}

function sendAudio(buffer, rms) {
  $("level").style.width = `${Math.min(100, rms * 400)}%`;
  if (!page.ws || page.ws.readyState !== WebSocket.OPEN) return;
  const bytes = new Uint8Array(buffer);
  send({ type: "input_audio_buffer.append", audio: base64FromBytes(bytes) });
  page.appended += 1;
  page.sentMs += (bytes.length / 2) * 1000 / RATE;
  const now = performance.now();
  page.sendLog.push([page.sentMs, now]);
  if (page.sendLog.length > 3000) page.sendLog.splice(0, 1000);
  if (rms >= VOICED_RMS) page.lastVoicedT = now;
}

function stop() {
  page.talking = false;
  interrupt();
  if (page.stream) page.stream.getTracks().forEach((t) => t.stop());
  if (page.ws) page.ws.close();
  if (page.ctx) page.ctx.close();
  page.stream = page.ws = page.ctx = null;
  $("talk").textContent = "Talk";
  $("talk").classList.remove("on");
  $("level").style.width = "0";
  status("not connected");
}

$("talk").addEventListener("click", () => {
  if (page.talking) { stop(); return; }
  start().catch((err) => {
    showError(`could not start: ${err.message || err}`);
    stop();
  });
});

/*
 * Voice agent test page: the browser side of the voice pipeline protocol at /ws.
 *
 * Every message is JSON {type, data}. The page sends init / audio / text / end and
 * shows what the server sends back: the transcript, the agent's audio (one WAV per
 * sentence, played in order), the pipeline state and a timed event log.
 *
 * Hooks for automated tests (all on the DOM):
 *   body[data-state]            Disconnected | Connecting | Connected | Listening | Thinking | Speaking | Idle
 *   body[data-state-history]    comma-separated states the page has been in (most recent 200)
 *   body[data-last-error]       the last error shown ("" when none); body[data-error-count]
 *   body[data-session]          "active" between init_success and session_ended
 *   #transcript .entry[data-role="user|agent|system"][data-final="true|false"]
 *   #player[data-played-count]  clips that finished playing; also data-started-count,
 *                               data-received-count, data-queued-count, data-playing
 *   #log tr[data-type]          one row per message (data-dir="in|out|local")
 */
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const ui = {
    body: document.body,
    stateLabel: $("state-label"),
    error: $("error"),
    errorText: $("error-text"),
    errorDismiss: $("error-dismiss"),
    wsUrl: $("ws-url"),
    connect: $("connect"),
    disconnect: $("disconnect"),
    agentId: $("agent-id"),
    callLogId: $("call-log-id"),
    init: $("init"),
    end: $("end"),
    agentName: $("agent-name"),
    sessionCallLogId: $("session-call-log-id"),
    player: $("player"),
    playerStatus: $("player-status"),
    playedCount: $("played-count"),
    queuedCount: $("queued-count"),
    stopAudio: $("stop-audio"),
    replyDownload: $("reply-download"),
    talk: $("talk"),
    talkLabel: $("talk-label"),
    metrics: $("metrics"),
    transcript: $("transcript"),
    textForm: $("text-form"),
    textInput: $("text-input"),
    send: $("send"),
    log: $("log"),
    clearLog: $("clear-log"),
  };

  const MAX_LOG_ROWS = 400;
  const MAX_HISTORY = 200;
  const MIN_RECORDING_MS = 250;
  const CLOSE_CODES = {
    1001: "going away",
    1002: "protocol error",
    1003: "unsupported data",
    1006: "abnormal closure: the server is unreachable or dropped the connection",
    1007: "invalid data",
    1008: "policy violation",
    1009: "message too big",
    1011: "server error",
    1012: "service restart",
    1013: "try again later",
  };

  const app = {
    ws: null,
    connecting: false,
    connected: false,
    closingByUser: false,
    session: false,
    callLogId: null,
    busy: false, // a turn is being processed by the server
    awaitingGreeting: false, // after init_success, until the greeting's audio (or a few seconds)
    turn: null, // {kind, start, marks:{}, audioCount}
    agentEntry: null, // the transcript entry the agent is currently writing
    agentEntrySource: null, // "llm" (streamed reply) or "audio" (greeting from audio_response texts)
    userEntry: null, // the pending user entry of an audio turn (filled by stt_complete)
    recording: false,
    talkWanted: false,
    sending: false, // released: the recording is being packed and sent
    recorder: null,
    stream: null,
    recordStart: 0,
    connectedAt: 0,
    state: "",
    stateHistory: [],
    errorCount: 0,
    replyUrl: null,
  };

  /* ------------------------------------------------------------------ utils */

  const now = () => performance.now();

  function clock(date = new Date()) {
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
  }

  function base64ToBytes(b64) {
    const binary = atob(b64);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  function blobToBase64(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => {
        const url = String(reader.result);
        resolve(url.slice(url.indexOf(",") + 1));
      };
      reader.onerror = () => reject(reader.error || new Error("could not read the recording"));
      reader.readAsDataURL(blob);
    });
  }

  /**
   * Duration in seconds of a PCM WAV from its first bytes (null when the header is not understood).
   * totalLength is the whole file's size, used when the data chunk's size field is unset.
   */
  function wavDuration(bytes, totalLength = bytes.length) {
    if (bytes.length < 44) return null;
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const tag = (o) => String.fromCharCode(bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]);
    if (tag(0) !== "RIFF" || tag(8) !== "WAVE") return null;
    let offset = 12;
    let byteRate = 0;
    while (offset + 8 <= bytes.length) {
      const id = tag(offset);
      const size = view.getUint32(offset + 4, true);
      if (id === "fmt " && offset + 20 <= bytes.length) byteRate = view.getUint32(offset + 16, true);
      if (id === "data") {
        const available = totalLength - offset - 8;
        const dataSize = size === 0 || size === 0xffffffff ? available : Math.min(size, available);
        return byteRate ? dataSize / byteRate : null;
      }
      offset += 8 + size + (size % 2);
    }
    return null;
  }

  /**
   * One PCM WAV of several (the sentences of a reply, each a WAV of its own), or null when they are not
   * all PCM WAVs of one format.
   */
  function joinWavs(clips) {
    const parts = [];
    let format = null;
    for (const bytes of clips) {
      if (bytes.length < 44) return null;
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const tag = (o) => String.fromCharCode(bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]);
      if (tag(0) !== "RIFF" || tag(8) !== "WAVE") return null;
      let fmt = null;
      let data = null;
      for (let offset = 12; offset + 8 <= bytes.length && !data; ) {
        const size = view.getUint32(offset + 4, true);
        if (tag(offset) === "fmt " && offset + 24 <= bytes.length) fmt = bytes.slice(offset + 8, offset + 24);
        if (tag(offset) === "data") data = bytes.subarray(offset + 8, Math.min(bytes.length, offset + 8 + size));
        offset += 8 + size + (size % 2);
      }
      if (!fmt || !data) return null;
      const key = Array.from(fmt).join(",");
      if (format !== null && format.key !== key) return null;
      format = { key, fmt };
      parts.push(data);
    }
    if (!format) return null;
    const length = parts.reduce((total, part) => total + part.length, 0);
    const out = new Uint8Array(44 + length);
    const view = new DataView(out.buffer);
    const put = (o, text) => [...text].forEach((c, i) => (out[o + i] = c.charCodeAt(0)));
    put(0, "RIFF");
    view.setUint32(4, 36 + length, true);
    put(8, "WAVEfmt ");
    view.setUint32(16, 16, true);
    out.set(format.fmt, 20);
    put(36, "data");
    view.setUint32(40, length, true);
    let offset = 44;
    for (const part of parts) {
      out.set(part, offset);
      offset += part.length;
    }
    return out;
  }

  function describeAudio(b64) {
    if (typeof b64 !== "string") return "no audio";
    const padding = b64.endsWith("==") ? 2 : b64.endsWith("=") ? 1 : 0;
    const size = (b64.length * 3) / 4 - padding;
    const kb = (size / 1024).toFixed(1);
    let seconds = null;
    try {
      seconds = wavDuration(base64ToBytes(b64.slice(0, 1024)), size);
    } catch (_) {
      seconds = null;
    }
    return seconds === null ? `${kb} KB` : `WAV ${seconds.toFixed(2)} s, ${kb} KB`;
  }

  function summarize(data) {
    if (data === undefined || data === null) return "";
    if (typeof data !== "object") return String(data);
    const parts = [];
    for (const [key, value] of Object.entries(data)) {
      if (key === "audio") {
        parts.push(`audio: ${describeAudio(value)}`);
      } else if (key === "fullText") {
        parts.push(`fullText: ${String(value).length} chars`);
      } else if (key === "chunk" || key === "text" || key === "message" || key === "error") {
        let s = String(value);
        if (s.length > 140) s = `${s.slice(0, 140)}…`;
        parts.push(`${key}: ${JSON.stringify(s)}`);
      } else {
        let s = typeof value === "string" ? value : JSON.stringify(value);
        if (s && s.length > 80) s = `${s.slice(0, 80)}…`;
        parts.push(`${key}: ${s}`);
      }
    }
    return parts.join(" · ");
  }

  /* ---------------------------------------------------------------- errors */

  function showError(message) {
    const text = String(message || "Unknown error");
    app.errorCount += 1;
    ui.body.dataset.lastError = text;
    ui.body.dataset.errorCount = String(app.errorCount);
    ui.errorText.textContent = text;
    ui.error.hidden = false;
    logRow("local", "error", text, true);
  }

  ui.errorDismiss.addEventListener("click", () => {
    ui.error.hidden = true;
  });

  /* ------------------------------------------------------------------- log */

  function logRow(dir, type, detail, isError = false) {
    const t = now();
    const origin = app.turn ? app.turn.start : app.connectedAt || t;
    const top = ui.log.firstElementChild;
    if (type === "llm_chunk" && top && top.dataset.type === "llm_chunk" && top.dataset.dir === dir) {
      // Streamed chunks share one row: the count, the latest time and the latest detail.
      const count = Number(top.dataset.count || "1") + 1;
      top.dataset.count = String(count);
      top.cells[0].textContent = clock();
      top.cells[1].textContent = `+${Math.max(0, Math.round(t - origin))}`;
      top.cells[3].textContent = `${type} ×${count}`;
      top.cells[4].textContent = detail || "";
      return;
    }
    const row = document.createElement("tr");
    row.dataset.type = type;
    row.dataset.dir = dir;
    if (isError || type === "error") row.classList.add("is-error");
    const cells = [
      clock(),
      `+${Math.max(0, Math.round(t - origin))}`,
      dir === "in" ? "↓" : dir === "out" ? "↑" : "•",
      type,
      detail || "",
    ];
    cells.forEach((value, i) => {
      const cell = document.createElement("td");
      cell.textContent = value;
      if (i === 2) cell.className = `dir dir-${dir}`;
      if (i === 3) cell.className = "type";
      if (i === 4) cell.className = "detail";
      row.appendChild(cell);
    });
    ui.log.insertBefore(row, ui.log.firstChild);
    while (ui.log.childElementCount > MAX_LOG_ROWS) ui.log.removeChild(ui.log.lastChild);
  }

  ui.clearLog.addEventListener("click", () => {
    ui.log.textContent = "";
  });

  /* ------------------------------------------------------------ transcript */

  function addEntry(role, text, final = true) {
    const empty = ui.transcript.querySelector(".empty");
    if (empty) empty.remove();
    const entry = document.createElement("div");
    entry.className = `entry entry-${role}`;
    entry.dataset.role = role;
    entry.dataset.final = String(final);
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : role === "agent" ? app.agentLabel || "Agent" : "";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = clock().slice(0, 8);
    if (role !== "system") entry.appendChild(who);
    entry.appendChild(body);
    if (role !== "system") entry.appendChild(meta);
    ui.transcript.appendChild(entry);
    scrollTranscript();
    return entry;
  }

  function setEntryText(entry, text, final) {
    if (!entry) return;
    entry.querySelector(".text").textContent = text;
    if (final !== undefined) entry.dataset.final = String(final);
    scrollTranscript();
  }

  function entryText(entry) {
    return entry ? entry.querySelector(".text").textContent : "";
  }

  function scrollTranscript() {
    ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  /* --------------------------------------------------------------- metrics */

  /** The greeting follows init_success; if none comes within a few seconds, the agent has none. */
  function expectGreeting(on) {
    clearTimeout(app.greetingTimer);
    app.awaitingGreeting = on;
    if (on) {
      app.greetingTimer = setTimeout(() => {
        app.awaitingGreeting = false;
        render();
      }, 6000);
    }
  }

  function startTurn(kind) {
    expectGreeting(false);
    clearTimeout(app.textTurnTimer);
    app.turn = { kind, start: now(), marks: {}, audioCount: 0, replyClips: [] };
    app.agentEntry = null;
    app.agentEntrySource = null;
    app.busy = true;
    renderMetrics();
  }

  function mark(name) {
    if (!app.turn || app.turn.marks[name] !== undefined) return;
    app.turn.marks[name] = now() - app.turn.start;
    renderMetrics();
  }

  function renderMetrics() {
    const turn = app.turn;
    ui.metrics.textContent = "";
    if (!turn) return;
    const labels = [
      ["stt", "transcribed"],
      ["firstToken", "first token"],
      ["llm", "reply text"],
      ["firstAudio", "first audio"],
      ["heard", "playing"],
      ["done", "done"],
    ];
    const title = document.createElement("span");
    title.className = "metrics-title";
    title.textContent = turn.kind === "audio" ? "Voice turn" : "Text turn";
    ui.metrics.appendChild(title);
    for (const [key, label] of labels) {
      if (turn.marks[key] === undefined) continue;
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.dataset.metric = key;
      chip.textContent = `${label} ${(turn.marks[key] / 1000).toFixed(2)} s`;
      ui.metrics.appendChild(chip);
    }
  }

  /* -------------------------------------------------------------- playback */

  const player = {
    ctx: null,
    queue: [], // [{decoded: Promise<AudioBuffer>, text}]
    current: null, // the AudioBufferSourceNode playing now
    pumping: false,
    inSequence: false, // between clips of one run of queued audio: the agent is still speaking
    generation: 0,
    received: 0,
    started: 0,
    played: 0,

    context() {
      if (!this.ctx) {
        const Ctx = window.AudioContext || window.webkitAudioContext;
        if (!Ctx) throw new Error("This browser has no Web Audio API");
        this.ctx = new Ctx();
        this.ctx.onstatechange = () => update();
      }
      if (this.ctx.state === "suspended") this.ctx.resume().catch(() => {});
      return this.ctx;
    },

    enqueue(b64, text) {
      this.received += 1;
      let decoded;
      try {
        const bytes = base64ToBytes(b64);
        decoded = this.context().decodeAudioData(bytes.buffer);
      } catch (err) {
        decoded = Promise.reject(err);
      }
      decoded.catch(() => {}); // handled when its turn comes
      this.queue.push({ decoded, text });
      update();
      this.pump();
    },

    async pump() {
      if (this.pumping || this.current || this.queue.length === 0) return;
      this.pumping = true;
      const generation = this.generation;
      const item = this.queue.shift();
      let buffer;
      try {
        buffer = await item.decoded;
      } catch (err) {
        if (generation === this.generation) {
          this.pumping = false;
          this.inSequence = this.inSequence && this.queue.length > 0;
          showError(`Could not decode agent audio: ${err && err.message ? err.message : err}`);
          update();
          this.pump();
        }
        return;
      }
      if (generation !== this.generation) return; // stopped meanwhile
      const ctx = this.context();
      const source = ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(ctx.destination);
      let finished = false;
      let watchdog = null;
      const finish = () => {
        if (finished) return;
        finished = true;
        clearTimeout(watchdog);
        if (this.current === source) this.current = null;
        this.played += 1;
        this.inSequence = this.queue.length > 0;
        this.pump();
        update();
      };
      // onended is the normal path; the watchdog covers audio outputs that never report it
      // (only while the context runs: a suspended context means nothing is heard).
      const arm = (ms) => {
        watchdog = setTimeout(() => {
          if (ctx.state === "running") finish();
          else arm(500);
        }, ms);
      };
      source.onended = finish;
      this.current = source;
      this.pumping = false;
      this.inSequence = true;
      this.started += 1;
      source.start();
      arm(buffer.duration * 1000 + 2000);
      if (item.text) ui.player.dataset.text = item.text;
      mark("heard");
      update();
    },

    stop() {
      this.generation += 1;
      this.queue = [];
      this.pumping = false;
      this.inSequence = false;
      if (this.current) {
        const source = this.current;
        this.current = null;
        source.onended = null;
        try {
          source.stop();
        } catch (_) {
          /* already stopped */
        }
      }
      update();
    },

    pending() {
      return this.pumping || this.queue.length > 0;
    },
  };

  ui.stopAudio.addEventListener("click", () => player.stop());

  // A user gesture anywhere (re)enables audio output if the browser suspended it.
  for (const ev of ["pointerdown", "keydown"]) {
    window.addEventListener(
      ev,
      () => {
        if (player.ctx && player.ctx.state === "suspended") player.ctx.resume().catch(() => {});
      },
      true,
    );
  }

  /* ------------------------------------------------------------- websocket */

  function defaultWsUrl() {
    const params = new URLSearchParams(location.search);
    if (params.get("ws")) return params.get("ws");
    if (!location.host) return "ws://localhost:8000/ws";
    return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  }

  function send(type, data = {}) {
    if (!app.ws || app.ws.readyState !== WebSocket.OPEN) {
      showError("Not connected");
      return false;
    }
    app.ws.send(JSON.stringify({ type, data }));
    logRow("out", type, summarize(data));
    return true;
  }

  function connect() {
    if (app.ws) return;
    const url = ui.wsUrl.value.trim() || defaultWsUrl();
    try {
      player.context(); // created inside the click: browsers allow audio output from then on
    } catch (err) {
      showError(err.message);
    }
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      showError(`Invalid WebSocket URL ${url}: ${err.message}`);
      return;
    }
    app.ws = ws;
    app.connecting = true;
    app.closingByUser = false;
    app.connectedAt = now();
    logRow("local", "connecting", url);
    render();

    ws.onopen = () => {
      if (app.ws !== ws) return;
      app.connecting = false;
      app.connected = true;
      app.connectedAt = now();
      logRow("local", "open", url);
      render();
    };
    ws.onerror = () => {
      if (app.ws !== ws) return;
      logRow("local", "ws-error", "WebSocket error", true);
    };
    ws.onclose = (event) => {
      if (app.ws !== ws) return;
      const wasConnected = app.connected;
      app.ws = null;
      app.connecting = false;
      app.connected = false;
      app.session = false;
      app.busy = false;
      app.sending = false;
      expectGreeting(false);
      stopTalk(true);
      player.stop();
      const meaning = CLOSE_CODES[event.code];
      const reason = event.reason ? `: ${event.reason}` : meaning ? `, ${meaning}` : "";
      logRow("local", "close", `code ${event.code}${reason}`);
      if (!app.closingByUser && event.code !== 1000) {
        showError(
          wasConnected
            ? `WebSocket closed (code ${event.code}${reason})`
            : `Could not connect to ${url} (code ${event.code}${reason})`,
        );
      }
      render();
    };
    ws.onmessage = (event) => handleMessage(event.data);
  }

  function disconnect() {
    if (!app.ws) return;
    app.closingByUser = true;
    app.ws.close(1000, "bye");
  }

  /* ------------------------------------------------------ server messages */

  function handleMessage(raw) {
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch (_) {
      showError(`Unparseable message from the server: ${String(raw).slice(0, 120)}`);
      return;
    }
    if (!msg || typeof msg !== "object") {
      showError("Message from the server is not an object");
      return;
    }
    const type = String(msg.type || "unknown");
    const data = msg.data && typeof msg.data === "object" ? msg.data : msg;
    logRow("in", type, summarize(type === "unknown" ? msg : msg.data !== undefined ? msg.data : stripType(msg)));

    switch (type) {
      case "init_success": {
        app.session = true;
        app.turn = null;
        app.busy = false;
        app.agentEntry = null;
        app.agentEntrySource = null;
        app.callLogId = data.callLogId || null;
        app.agentLabel = data.agentName || "Agent";
        ui.agentName.textContent = data.agentName || "—";
        ui.sessionCallLogId.textContent = data.callLogId || "—";
        addEntry("system", `Session started${data.agentName ? ` with ${data.agentName}` : ""}${data.message ? ` — ${data.message}` : ""}`);
        renderMetrics();
        expectGreeting(true);
        break;
      }
      case "processing_started":
        if (!app.turn || app.turn.kind !== "audio" || app.turn.marks.processing !== undefined) {
          if (!app.turn || app.turn.kind !== "audio") startTurn("audio");
        }
        app.busy = true;
        mark("processing");
        break;
      case "stt_start":
        app.busy = true;
        break;
      case "stt_complete": {
        const text = typeof data.text === "string" ? data.text.trim() : "";
        const shown = text || "(no speech recognised)";
        if (app.userEntry) {
          setEntryText(app.userEntry, shown, true);
          app.userEntry.classList.remove("pending");
          app.userEntry = null;
        } else {
          addEntry("user", shown);
        }
        mark("stt");
        break;
      }
      case "llm_start":
        if (!app.turn) startTurn("text");
        app.busy = true;
        if (app.agentEntry && app.agentEntrySource !== "llm") app.agentEntry = null;
        break;
      case "llm_chunk": {
        if (!app.agentEntry || app.agentEntrySource !== "llm") {
          app.agentEntry = addEntry("agent", "", false);
          app.agentEntrySource = "llm";
        }
        const full =
          typeof data.fullText === "string" ? data.fullText : entryText(app.agentEntry) + (data.chunk || "");
        setEntryText(app.agentEntry, full, false);
        mark("firstToken");
        break;
      }
      case "llm_complete":
      case "text_response": {
        const text = typeof data.text === "string" ? data.text : null;
        if (!app.agentEntry || app.agentEntrySource !== "llm") {
          if (text !== null) {
            app.agentEntry = addEntry("agent", text, true);
            app.agentEntrySource = "llm";
          }
        } else {
          setEntryText(app.agentEntry, text !== null && text !== "" ? text : entryText(app.agentEntry), true);
        }
        mark("llm");
        if (type === "text_response" && app.turn && app.turn.kind === "text") {
          app.turn.textDone = true;
          finishTextTurnIfDone();
        }
        break;
      }
      case "tts_start":
        if (app.turn) app.turn.speaking = true;
        if (app.turn && app.turn.kind === "text" && !app.turn.ttsDone) app.busy = true;
        break;
      case "audio_response": {
        expectGreeting(false);
        if (typeof data.audio === "string" && data.audio) {
          player.enqueue(data.audio, data.text);
          mark("firstAudio");
          if (app.turn && app.turn.kind === "text" && app.turn.textDone) finishTextTurnIfDone();
        } else {
          logRow("local", "warning", "audio_response without audio");
        }
        // Outside a streamed reply (the greeting), the sentence texts make the agent's line.
        if (data.text && (!app.agentEntry || app.agentEntrySource === "audio")) {
          if (!app.agentEntry) {
            app.agentEntry = addEntry("agent", data.text, true);
            app.agentEntrySource = "audio";
          } else {
            setEntryText(app.agentEntry, `${entryText(app.agentEntry)} ${data.text}`.trim(), true);
          }
        }
        break;
      }
      case "tts_complete":
        // One sentence's audio (audio_response plays the same); the download offers the reply so far.
        if (typeof data.audio === "string" && data.audio) addToReplyDownload(data.audio);
        break;
      case "processing_complete":
        app.busy = false;
        mark("done");
        if (app.turn) {
          app.turn.ttsDone = true;
          if (app.turn.kind === "text") finishTextTurnIfDone();
        }
        break;
      case "session_ended":
        expectGreeting(false);
        app.session = false;
        app.busy = false;
        app.agentEntry = null;
        addEntry("system", `Session ended${data.callLogId ? ` (call log ${data.callLogId})` : ""}`);
        break;
      case "error": {
        const text = data.error || data.message || "error";
        app.busy = false;
        expectGreeting(false);
        if (app.userEntry) {
          app.userEntry.classList.remove("pending");
          setEntryText(app.userEntry, "(not understood)", true);
          app.userEntry = null;
        }
        showError(typeof text === "string" ? text : JSON.stringify(text));
        break;
      }
      default:
        break; // logged above
    }
    render();
  }

  /**
   * A text turn is over at text_response, or, when the server speaks the reply (sentence by sentence:
   * tts_start, tts_complete, audio_response), at the processing_complete after its last sentence. A
   * server that speaks without sending processing_complete is given a few quiet seconds after its last audio.
   */
  function finishTextTurnIfDone() {
    const turn = app.turn;
    if (!turn || turn.kind !== "text" || !turn.textDone) return;
    clearTimeout(app.textTurnTimer);
    if (!turn.speaking || turn.ttsDone) {
      app.busy = false;
      mark("done");
      return;
    }
    app.textTurnTimer = setTimeout(() => {
      if (app.turn === turn && app.busy) {
        app.busy = false;
        mark("done");
        render();
      }
    }, 8000);
  }

  function stripType(msg) {
    const copy = { ...msg };
    delete copy.type;
    return copy;
  }

  function addToReplyDownload(b64) {
    try {
      const clip = base64ToBytes(b64);
      const clips = app.turn ? app.turn.replyClips : [];
      clips.push(clip);
      const blob = new Blob([joinWavs(clips) || clip], { type: "audio/wav" });
      if (app.replyUrl) URL.revokeObjectURL(app.replyUrl);
      app.replyUrl = URL.createObjectURL(blob);
      ui.replyDownload.href = app.replyUrl;
      ui.replyDownload.hidden = false;
    } catch (err) {
      logRow("local", "warning", `tts_complete audio unreadable: ${err.message}`);
    }
  }

  /* --------------------------------------------------------------- talking */

  function pickMimeType() {
    if (!window.MediaRecorder || !MediaRecorder.isTypeSupported) return "";
    for (const type of ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm", "audio/ogg"]) {
      if (MediaRecorder.isTypeSupported(type)) return type;
    }
    return "";
  }

  function micErrorMessage(err) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "SecurityError") return "Microphone permission denied";
    if (name === "NotFoundError" || name === "OverconstrainedError") return "No microphone found";
    if (name === "NotReadableError") return "The microphone is in use by another application";
    return `Microphone error: ${(err && err.message) || err}`;
  }

  function canTalk() {
    return app.connected && app.session;
  }

  async function startTalk() {
    if (app.recording || app.talkWanted || !canTalk()) return;
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError("Microphone unavailable: this page needs HTTPS or localhost");
      return;
    }
    if (!window.MediaRecorder) {
      showError("This browser cannot record audio (no MediaRecorder)");
      return;
    }
    app.talkWanted = true;
    player.stop(); // the user talks over the agent: stop its audio here
    render();
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (err) {
      app.talkWanted = false;
      showError(micErrorMessage(err));
      render();
      return;
    }
    if (!app.talkWanted || !canTalk()) {
      stream.getTracks().forEach((t) => t.stop());
      render();
      return;
    }
    const mimeType = pickMimeType();
    let recorder;
    try {
      recorder = mimeType ? new MediaRecorder(stream, { mimeType }) : new MediaRecorder(stream);
    } catch (err) {
      stream.getTracks().forEach((t) => t.stop());
      app.talkWanted = false;
      showError(`Cannot record: ${err.message}`);
      render();
      return;
    }
    const chunks = [];
    const startedAt = now();
    recorder.ondataavailable = (e) => {
      if (e.data && e.data.size) chunks.push(e.data);
    };
    recorder.onerror = (e) => showError(`Recording failed: ${(e.error && e.error.message) || "unknown error"}`);
    recorder.onstop = async () => {
      stream.getTracks().forEach((t) => t.stop());
      if (app.stream === stream) app.stream = null;
      if (app.recorder === recorder) app.recorder = null;
      const duration = now() - startedAt;
      app.sending = false;
      if (recorder.discard) {
        render();
        return;
      }
      if (duration < MIN_RECORDING_MS || chunks.length === 0) {
        logRow("local", "too-short", `${Math.round(duration)} ms recorded: hold the button while you speak`);
        render();
        return;
      }
      app.sending = true;
      const blob = new Blob(chunks, { type: recorder.mimeType || mimeType || "audio/webm" });
      try {
        const audio = await blobToBase64(blob);
        app.sending = false;
        if (!canTalk()) {
          render();
          return;
        }
        startTurn("audio");
        app.userEntry = addEntry("user", "…", false);
        app.userEntry.classList.add("pending");
        logRow("local", "recorded", `${(duration / 1000).toFixed(2)} s, ${blob.type}, ${(blob.size / 1024).toFixed(1)} KB`);
        if (!send("audio", { audio })) app.busy = false;
      } catch (err) {
        showError(`Could not send the recording: ${err.message}`);
      }
      app.sending = false;
      render();
    };
    app.stream = stream;
    app.recorder = recorder;
    app.recording = true;
    app.recordStart = startedAt;
    recorder.start();
    logRow("local", "listening", mimeType || "default format");
    render();
  }

  function stopTalk(discard = false) {
    app.talkWanted = false;
    const recorder = app.recorder;
    if (recorder && recorder.state !== "inactive") {
      recorder.discard = discard;
      app.sending = !discard; // Thinking from the release on, until onstop has sent or dropped it
      recorder.stop();
    }
    app.recording = false;
    render();
  }

  ui.talk.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    e.preventDefault();
    try {
      ui.talk.setPointerCapture(e.pointerId);
    } catch (_) {
      /* not capturable */
    }
    startTalk();
  });
  for (const ev of ["pointerup", "pointercancel", "lostpointercapture"]) {
    ui.talk.addEventListener(ev, () => {
      if (app.talkWanted || app.recording) stopTalk();
    });
  }
  ui.talk.addEventListener("contextmenu", (e) => e.preventDefault());

  const isTyping = (target) =>
    target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.isContentEditable);

  window.addEventListener("keydown", (e) => {
    if (e.code !== "Space" || isTyping(e.target)) return;
    e.preventDefault();
    if (!e.repeat) startTalk();
  });
  window.addEventListener("keyup", (e) => {
    if (e.code !== "Space" || isTyping(e.target)) return;
    e.preventDefault();
    if (app.talkWanted || app.recording) stopTalk();
  });
  window.addEventListener("blur", () => {
    if (app.talkWanted || app.recording) stopTalk();
  });

  /* -------------------------------------------------------------- controls */

  ui.connect.addEventListener("click", connect);
  ui.disconnect.addEventListener("click", disconnect);
  ui.init.addEventListener("click", () => {
    const data = { agentId: ui.agentId.value.trim() || "default" };
    const callLogId = ui.callLogId.value.trim();
    if (callLogId) data.callLogId = callLogId;
    player.context();
    send("init", data);
  });
  ui.end.addEventListener("click", () => {
    stopTalk(true);
    player.stop();
    send("end", {});
  });
  ui.textForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = ui.textInput.value.trim();
    if (!text || !canTalk()) return;
    player.stop();
    player.context();
    startTurn("text");
    addEntry("user", text);
    if (send("text", { text })) ui.textInput.value = "";
    else app.busy = false;
    render();
  });

  /* ---------------------------------------------------------------- render */

  function computeState() {
    if (app.connecting) return "Connecting";
    if (!app.connected) return "Disconnected";
    if (app.recording || app.talkWanted) return "Listening";
    if (player.current) return "Speaking";
    if (app.busy || app.sending || player.pending() || app.awaitingGreeting) {
      // Once the reply is audible, pauses between its sentences are still Speaking.
      const heard = app.turn && app.turn.marks.heard !== undefined;
      return heard || player.inSequence ? "Speaking" : "Thinking";
    }
    if (!app.session) return "Connected";
    return "Idle";
  }

  function update() {
    ui.player.dataset.playedCount = String(player.played);
    ui.player.dataset.startedCount = String(player.started);
    ui.player.dataset.receivedCount = String(player.received);
    ui.player.dataset.queuedCount = String(player.queue.length);
    ui.player.dataset.playing = String(Boolean(player.current));
    ui.playedCount.textContent = String(player.played);
    ui.queuedCount.textContent = String(player.queue.length + (player.pumping ? 1 : 0));
    let status = "Silent";
    if (player.ctx && player.ctx.state === "suspended" && (player.current || player.pending())) {
      status = "Audio blocked — click anywhere";
    } else if (player.current) {
      status = "Playing";
    } else if (player.pending()) {
      status = "Loading…";
    }
    ui.playerStatus.textContent = status;
    ui.player.classList.toggle("is-playing", Boolean(player.current));
    ui.stopAudio.disabled = !player.current && !player.pending();
    renderState();
  }

  function renderState() {
    const state = computeState();
    if (state !== app.state) {
      app.state = state;
      app.stateHistory.push(state);
      if (app.stateHistory.length > MAX_HISTORY) app.stateHistory.shift();
      ui.body.dataset.state = state;
      ui.body.dataset.stateHistory = app.stateHistory.join(",");
      ui.stateLabel.textContent = state === "Thinking" ? "Thinking…" : state === "Listening" ? "Listening…" : state;
    }
  }

  function render() {
    const open = app.connected;
    ui.connect.disabled = Boolean(app.ws);
    ui.disconnect.disabled = !app.ws;
    ui.wsUrl.disabled = Boolean(app.ws);
    ui.init.disabled = !open || app.session;
    ui.agentId.disabled = app.session;
    ui.callLogId.disabled = app.session;
    ui.end.disabled = !open || !app.session;
    const talkable = canTalk();
    ui.talk.disabled = !talkable;
    ui.textInput.disabled = !talkable;
    ui.send.disabled = !talkable;
    const listening = app.recording || app.talkWanted;
    ui.talk.classList.toggle("is-recording", listening);
    ui.talk.setAttribute("aria-pressed", String(listening));
    ui.talkLabel.textContent = listening ? "Listening… release to send" : "Hold to talk";
    ui.body.dataset.session = app.session ? "active" : "none";
    update();
  }

  /* ------------------------------------------------------------------ boot */

  ui.wsUrl.value = defaultWsUrl();
  const agentParam = new URLSearchParams(location.search).get("agent");
  if (agentParam) ui.agentId.value = agentParam;
  ui.body.dataset.errorCount = "0";
  render();

  // For debugging from the console and for tests.
  window.voiceApp = { app, player, send, connect, disconnect, startTalk, stopTalk };
})();

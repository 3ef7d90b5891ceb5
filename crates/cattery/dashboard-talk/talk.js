// "Talk to a bot" for the dashboard (docs/dashboard.md): a SmallWebRTC call from the browser
// with Pipecat's own client packages, bundled by build.sh into
// crates/cattery/src/dashboard/assets/talk.js (embedded in the binary, loaded by app.js only
// when Talk is pressed). Exposes window.CatteryTalk.start(...) and nothing else.
//
// The connection is Pipecat Cloud's: startBotAndConnect() POSTs /v1/public/{agent}/start with
// the public key, and the transport sends its SDP offer to
// /v1/public/{agent}/sessions/{sessionId}/api/offer (the session proxy) with the same headers.

import { PipecatClient } from "@pipecat-ai/client-js";
import { SmallWebRTCTransport } from "@pipecat-ai/small-webrtc-transport";

// The microphone straight from getUserMedia. The transport's default media manager drives
// devices through Daily's call object, which loads code from Daily's servers: that would
// break offline use and the dashboard's Content-Security-Policy, so it is never built (build.sh
// swaps daily-js for a stub).
class BrowserMediaManager {
  constructor() {
    this._options = null;
    this._callbacks = {};
    this._micEnabled = true;
    this._stream = null;
  }
  setUserAudioCallback() {}
  setClientOptions(options, override = false) {
    if (this._options && !override) return;
    this._options = options;
    this._callbacks = options.callbacks || {};
    this._micEnabled = options.enableMic !== false;
  }
  get supportsScreenShare() {
    return false;
  }
  async initialize() {
    if (this._stream) return;
    this._stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
    const track = this._stream.getAudioTracks()[0];
    if (track) {
      track.enabled = this._micEnabled;
      this._callbacks.onTrackStarted?.(track, { local: true });
      this._callbacks.onMicUpdated?.(this.selectedMic);
    }
  }
  async connect() {}
  async disconnect() {
    if (this._stream) this._stream.getTracks().forEach((t) => t.stop());
    this._stream = null;
  }
  async userStartedSpeaking() {}
  bufferBotAudio() {}
  async _devices(kind) {
    const all = await navigator.mediaDevices.enumerateDevices();
    return all.filter((d) => d.kind === kind);
  }
  getAllMics() {
    return this._devices("audioinput");
  }
  getAllCams() {
    return Promise.resolve([]);
  }
  getAllSpeakers() {
    return this._devices("audiooutput");
  }
  updateMic() {}
  updateCam() {}
  updateSpeaker() {}
  get selectedMic() {
    const t = this._stream?.getAudioTracks()[0];
    return t ? { deviceId: t.getSettings().deviceId || "", label: t.label, kind: "audioinput" } : {};
  }
  get selectedCam() {
    return {};
  }
  get selectedSpeaker() {
    return {};
  }
  enableMic(enable) {
    this._micEnabled = enable;
    this._stream?.getAudioTracks().forEach((t) => (t.enabled = enable));
  }
  enableCam() {}
  enableScreenShare() {}
  get isMicEnabled() {
    return this._micEnabled;
  }
  get isCamEnabled() {
    return false;
  }
  get isSharingScreen() {
    return false;
  }
  tracks() {
    return { local: { audio: this._stream?.getAudioTracks()[0] } };
  }
}

// Audio the browser received from the bot, from the peer connection's inbound-rtp stats.
async function inboundAudio(pc) {
  const out = { packets: 0, samples: 0, level: 0 };
  if (!pc) return out;
  const stats = await pc.getStats();
  stats.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      out.packets += s.packetsReceived || 0;
      out.samples += s.totalSamplesReceived || 0;
      out.level = Math.max(out.level, s.audioLevel || 0);
    }
  });
  return out;
}

// Starts a `webrtc` session of `agent` and connects the microphone and the speaker.
// opts: { agent, publicKey, audio (an <audio> element), onState(text), onStats(stats),
// onSession(sessionId), onError(text) }. Returns { hangUp() }.
async function start(opts) {
  const say = (t) => opts.onState?.(t);
  const transport = new SmallWebRTCTransport({
    mediaManager: new BrowserMediaManager(),
    waitForICEGathering: true,
  });
  let maxLevel = 0;
  let timer = null;
  const client = new PipecatClient({
    transport,
    enableMic: true,
    enableCam: false,
    callbacks: {
      onTransportStateChanged: (state) => say(state),
      onConnected: () => say("connected"),
      onDisconnected: () => say("disconnected"),
      onBotReady: () => say("bot ready"),
      onBotStarted: (r) => opts.onSession?.(r && (r.sessionId || r.session_id)),
      onTrackStarted: (track, participant) => {
        if (track.kind === "audio" && !(participant && participant.local)) {
          opts.audio.srcObject = new MediaStream([track]);
          opts.audio.play().catch(() => {});
        }
      },
      onError: (e) => opts.onError?.((e && e.data && e.data.message) || String(e)),
    },
  });
  const poll = async () => {
    const s = await inboundAudio(transport.pc);
    maxLevel = Math.max(maxLevel, s.level);
    opts.onStats?.({ ...s, maxLevel });
  };
  timer = setInterval(() => poll().catch(() => {}), 500);
  say("starting");
  // Resolves on the bot's RTVI "bot-ready"; a bot without RTVI still talks, so the call's
  // state comes from the callbacks, not from this promise.
  client
    .startBotAndConnect({
      endpoint: `${location.origin}/v1/public/${encodeURIComponent(opts.agent)}/start`,
      headers: new Headers({ Authorization: `Bearer ${opts.publicKey}` }),
      // enableDefaultIceServers: the answer carries the server's --ice-servers as iceConfig,
      // which the transport uses for its peer connection.
      requestData: { transport: "webrtc", createDailyRoom: false, enableDefaultIceServers: true },
    })
    .catch((e) => {
      clearInterval(timer);
      opts.onError?.((e && e.message) || String(e));
    });
  return {
    async hangUp() {
      clearInterval(timer);
      await poll().catch(() => {});
      await client.disconnect().catch(() => {});
      say("ended");
    },
  };
}

window.CatteryTalk = { start };

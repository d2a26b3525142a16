// Audio worklets of omni's page: the microphone as PCM16 at 24 kHz, and a tap recording what the page plays.

// Resamples the microphone (the context's rate, e.g. 48 kHz) to `targetRate` by linear interpolation
// and posts PCM16 chunks of `chunkMs` with their RMS level (for the meter and for "last voiced audio").
class MicPcm16 extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.targetRate = o.targetRate || 24000;
    this.chunk = Math.round(this.targetRate * (o.chunkMs || 40) / 1000);
    this.step = sampleRate / this.targetRate;
    this.t = 0;          // input index of the next output sample; -1 is the previous block's last sample
    this.prev = 0;
    this.out = new Int16Array(this.chunk);
    this.n = 0;
    this.sumSq = 0;
  }

  push(v) {
    const s = Math.max(-1, Math.min(1, v));
    this.out[this.n++] = s < 0 ? s * 32768 : s * 32767;
    this.sumSq += s * s;
    if (this.n === this.chunk) {
      const rms = Math.sqrt(this.sumSq / this.chunk);
      this.port.postMessage({ pcm: this.out.buffer, rms }, [this.out.buffer]);
      this.out = new Int16Array(this.chunk);
      this.n = 0;
      this.sumSq = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const ch = input[0];
    for (;;) {
      const i = Math.floor(this.t);
      if (i + 1 >= ch.length) break;
      const a = i < 0 ? this.prev : ch[i];
      const b = ch[i + 1];
      this.push(a + (b - a) * (this.t - i));
      this.t += this.step;
    }
    this.t -= ch.length;
    this.prev = ch[ch.length - 1];
    return true;
  }
}

// Records what reaches it (the page's playback), block by block; silence while nothing plays.
class PlaybackTap extends AudioWorkletProcessor {
  process(inputs) {
    const input = inputs[0];
    this.port.postMessage(input && input.length ? input[0].slice(0) : new Float32Array(128));
    return true;
  }
}

registerProcessor("mic-pcm16", MicPcm16);
registerProcessor("playback-tap", PlaybackTap);

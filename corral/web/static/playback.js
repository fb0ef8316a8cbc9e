// Plays a recorded terminal session (asciicast v2) into xterm.js with its timing: play/pause and
// a speed choice. Idle stretches longer than two seconds are shortened (asciicast.js, delayMs).
import { openTerminal, setStatus } from "/static/xterm-setup.js";
import { CastError, delayMs, parseCast, parseSize } from "/static/asciicast.js";

const container = document.getElementById("terminal");
const playButton = document.getElementById("play");
const speedChoice = document.getElementById("speed");
const statusLine = document.getElementById("play-status");

class Player {
  constructor(term, cast) {
    this.term = term;
    this.cast = cast;
    this.next = 0; // index of the next event
    this.clock = 0; // recorded time reached, in seconds
    this.timer = null;
  }

  get playing() {
    return this.timer !== null;
  }

  get finished() {
    return this.next >= this.cast.events.length;
  }

  play(speed) {
    if (this.finished) this.rewind();
    this.speed = speed;
    this.schedule();
  }

  pause() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  rewind() {
    this.pause();
    this.next = 0;
    this.clock = 0;
    this.term.reset();
    this.term.resize(this.cast.width, this.cast.height);
  }

  schedule() {
    if (this.finished) {
      this.timer = null;
      this.onFinished();
      return;
    }
    const event = this.cast.events[this.next];
    this.timer = setTimeout(() => {
      this.apply(event);
      this.clock = event.time;
      this.next += 1;
      this.schedule();
    }, delayMs(this.clock, event.time, this.speed));
  }

  apply(event) {
    if (event.kind === "o") {
      this.term.write(event.data);
    } else if (event.kind === "r") {
      const size = parseSize(event.data);
      if (size) this.term.resize(size.cols, size.rows);
    }
  }

  onFinished() {}
}

async function load() {
  const response = await fetch(container.dataset.recording, { credentials: "same-origin" });
  if (!response.ok) {
    const doc = await response.json().catch(() => ({}));
    throw new Error(doc.detail || `the server answered ${response.status}`);
  }
  return parseCast(await response.text());
}

load().then((cast) => {
  const { term } = openTerminal(container, { cols: cast.width, rows: cast.height, disableStdin: true, cursorBlink: false });
  const player = new Player(term, cast);
  const seconds = cast.events.length ? cast.events[cast.events.length - 1].time : 0;
  const ready = `Ready: ${cast.events.length} events, ${seconds.toFixed(1)} s recorded.`;
  setStatus(statusLine, ready);
  player.onFinished = () => {
    playButton.textContent = "Play again";
    setStatus(statusLine, "Finished.", "ok");
  };
  playButton.disabled = false;
  playButton.addEventListener("click", () => {
    if (player.playing) {
      player.pause();
      playButton.textContent = "Play";
      setStatus(statusLine, "Paused.");
    } else {
      player.play(Number(speedChoice.value));
      playButton.textContent = "Pause";
      setStatus(statusLine, "Playing…");
    }
  });
  speedChoice.addEventListener("change", () => {
    if (player.playing) {
      player.pause();
      player.play(Number(speedChoice.value));
    }
  });
}, (error) => {
  const why = error instanceof CastError ? error.message : `could not load the recording: ${error.message}`;
  setStatus(statusLine, why, "error");
});

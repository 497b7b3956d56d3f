// Outpainting by dragging the frame's edges: a box around the selected image whose four edges
// drag outwards. The distances, in image pixels (multiples of 8, as the latents need), become
// the outpaint job's `extend` {left, right, top, bottom}.

const EDGES = ["left", "right", "top", "bottom"];

export class FrameDrag {
  constructor(wrap, imageWidth, onChange) {
    this.wrap = wrap;
    this.imageWidth = imageWidth;
    this.onChange = onChange;
    this.extend = { left: 0, right: 0, top: 0, bottom: 0 };
    this.active = null;
    this.box = document.createElement("div");
    this.box.className = "frame-box";
    for (const edge of EDGES) {
      const handle = document.createElement("div");
      handle.className = `frame-handle ${edge}`;
      handle.dataset.edge = edge;
      handle.title = `Drag to extend the ${edge} side (outpaint)`;
      handle.addEventListener("pointerdown", (e) => this.start(e, edge));
      handle.addEventListener("pointermove", (e) => this.drag(e));
      handle.addEventListener("pointerup", () => (this.active = null));
      handle.addEventListener("pointercancel", () => (this.active = null));
      this.box.append(handle);
    }
    wrap.append(this.box);
    this.layout();
  }

  /** Image pixels per CSS pixel of the displayed image. */
  scale() {
    return this.imageWidth / this.wrap.getBoundingClientRect().width;
  }

  start(e, edge) {
    e.preventDefault();
    e.target.setPointerCapture(e.pointerId);
    this.active = { edge, x: e.clientX, y: e.clientY, from: this.extend[edge] };
  }

  drag(e) {
    if (!this.active) return;
    const { edge, x, y, from } = this.active;
    const outwards = { left: x - e.clientX, right: e.clientX - x, top: y - e.clientY, bottom: e.clientY - y }[edge];
    this.extend[edge] = Math.max(0, Math.round((from + outwards * this.scale()) / 8) * 8);
    this.layout();
    this.onChange({ ...this.extend });
  }

  layout() {
    const s = 1 / this.scale();
    for (const edge of EDGES) this.box.style[edge] = `${-this.extend[edge] * s}px`;
    this.box.classList.toggle("extended", EDGES.some((k) => this.extend[k] > 0));
  }

  reset() {
    for (const edge of EDGES) this.extend[edge] = 0;
    this.layout();
    this.onChange({ ...this.extend });
  }
}

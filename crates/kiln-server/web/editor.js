// The mask brush: the selected image with a mask canvas over it, at the image's own
// resolution (so the mask has the image's size and needs no resampling). Pointer events cover
// mouse, touch and pen (pen pressure scales the brush). The mask is painted into the canvas's
// alpha (shown in red); maskPng() turns it into kiln's convention, white = repaint, black = keep.

export class MaskEditor {
  constructor(host) {
    this.host = host;
    this.size = 16;
    this.hardness = 0.8;
    this.rubOut = false;
    this.image = new Image();
    this.image.alt = "selected asset";
    this.canvas = document.createElement("canvas");
    this.canvas.className = "mask";
    this.canvas.title = "Drag to paint the area to inpaint or erase";
    this.wrap = document.createElement("div");
    this.wrap.className = "mask-wrap";
    this.wrap.append(this.image, this.canvas);
    host.replaceChildren(this.wrap);
    this.ctx = this.canvas.getContext("2d", { willReadFrequently: true });
    this.last = null;
    this.onDown = (e) => this.down(e);
    this.onMove = (e) => this.move(e);
    this.onUp = (e) => this.up(e);
    this.canvas.addEventListener("pointerdown", this.onDown);
    this.canvas.addEventListener("pointermove", this.onMove);
    this.canvas.addEventListener("pointerup", this.onUp);
    this.canvas.addEventListener("pointercancel", this.onUp);
  }

  async load(url) {
    this.image.src = url;
    await this.image.decode();
    this.canvas.width = this.image.naturalWidth;
    this.canvas.height = this.image.naturalHeight;
    // At most 300 px tall, as wide as the panel allows, in the image's proportions.
    this.wrap.style.aspectRatio = `${this.canvas.width} / ${this.canvas.height}`;
    this.wrap.style.width = `min(100%, ${(300 * this.canvas.width) / this.canvas.height}px)`;
  }

  destroy() {
    this.canvas.removeEventListener("pointerdown", this.onDown);
    this.host.replaceChildren();
  }

  /** Canvas pixel coordinates of a pointer event (the canvas is scaled by CSS to fit). */
  point(e) {
    const r = this.canvas.getBoundingClientRect();
    return {
      x: ((e.clientX - r.left) / r.width) * this.canvas.width,
      y: ((e.clientY - r.top) / r.height) * this.canvas.height,
      // A pen's pressure; a mouse reports 0.5 while pressed, treated as full size.
      pressure: e.pointerType === "pen" ? Math.max(0.1, e.pressure) : 1,
    };
  }

  down(e) {
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.dab(this.last);
  }

  move(e) {
    if (!this.last) return;
    const p = this.point(e);
    // Dabs along the segment, a quarter brush apart, so fast strokes stay continuous.
    const d = Math.hypot(p.x - this.last.x, p.y - this.last.y);
    const gap = Math.max(1, (this.size * p.pressure) / 4);
    for (let t = gap; t <= d; t += gap) {
      const k = t / d;
      this.dab({ x: this.last.x + (p.x - this.last.x) * k, y: this.last.y + (p.y - this.last.y) * k, pressure: p.pressure });
    }
    this.last = p;
  }

  up() {
    this.last = null;
    this.canvas.dispatchEvent(new CustomEvent("maskchange", { bubbles: true }));
  }

  /** One round dab: hard core out to `hardness` of the radius, then a soft falloff. */
  dab({ x, y, pressure }) {
    const r = Math.max(0.5, (this.size * pressure) / 2);
    const g = this.ctx.createRadialGradient(x, y, 0, x, y, r);
    g.addColorStop(0, "rgba(255,60,60,1)");
    g.addColorStop(Math.min(0.999, this.hardness), "rgba(255,60,60,1)");
    g.addColorStop(1, "rgba(255,60,60,0)");
    this.ctx.globalCompositeOperation = this.rubOut ? "destination-out" : "source-over";
    this.ctx.fillStyle = g;
    this.ctx.beginPath();
    this.ctx.arc(x, y, r, 0, Math.PI * 2);
    this.ctx.fill();
    this.ctx.globalCompositeOperation = "source-over";
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  invert() {
    const data = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
    for (let i = 0; i < data.data.length; i += 4) {
      data.data[i] = 255;
      data.data[i + 1] = data.data[i + 2] = 60;
      data.data[i + 3] = 255 - data.data[i + 3];
    }
    this.ctx.putImageData(data, 0, 0);
  }

  /** Share of the image the mask covers (0..1, counting partly covered pixels in part). */
  coverage() {
    const a = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height).data;
    let sum = 0;
    for (let i = 3; i < a.length; i += 4) sum += a[i];
    return sum / (255 * (a.length / 4));
  }

  /** The mask as an opaque grayscale PNG of the image's size: white = repaint. */
  maskPng() {
    const { width, height } = this.canvas;
    const src = this.ctx.getImageData(0, 0, width, height).data;
    const out = new ImageData(width, height);
    for (let i = 0; i < src.length; i += 4) {
      out.data[i] = out.data[i + 1] = out.data[i + 2] = src[i + 3];
      out.data[i + 3] = 255;
    }
    const c = document.createElement("canvas");
    c.width = width;
    c.height = height;
    c.getContext("2d").putImageData(out, 0, 0);
    return new Promise((resolve) => c.toBlob(resolve, "image/png"));
  }
}

// zegkit serve: the class and probability under the pointer.
// Each overlay <img class="zk-overlay"> carries data-hover, a PNG whose red channel is the class
// index and green channel the probability x 255, and data-classes, the class names as JSON.
(() => {
  const maps = new WeakMap();
  let lastMove = null;

  function readout(img) {
    let entry = maps.get(img);
    if (entry && entry.src === img.dataset.hover) return entry;
    entry = { src: img.dataset.hover, names: JSON.parse(img.dataset.classes || "[]"), data: null };
    maps.set(img, entry);
    const source = new Image();
    source.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = source.naturalWidth;
      canvas.height = source.naturalHeight;
      const context = canvas.getContext("2d", { willReadFrequently: true });
      context.drawImage(source, 0, 0);
      entry.width = canvas.width;
      entry.height = canvas.height;
      entry.data = context.getImageData(0, 0, canvas.width, canvas.height).data;
      if (lastMove) show(lastMove); // the pointer may already rest on the image
    };
    source.src = entry.src;
    return entry;
  }

  function hideOthers(keep) {
    document.querySelectorAll(".zk-tip").forEach((tip) => {
      if (tip !== keep) tip.hidden = true;
    });
  }

  function show(event) {
    lastMove = event;
    const img = event.target instanceof Element ? event.target.closest("img.zk-overlay") : null;
    if (!img || !img.dataset.hover) {
      hideOthers(null);
      return;
    }
    const tip = img.parentElement.querySelector(".zk-tip");
    hideOthers(tip);
    const entry = readout(img);
    if (!entry.data || !tip) return;
    const box = img.getBoundingClientRect();
    const x = Math.min(entry.width - 1, Math.max(0, Math.floor(((event.clientX - box.left) / box.width) * entry.width)));
    const y = Math.min(entry.height - 1, Math.max(0, Math.floor(((event.clientY - box.top) / box.height) * entry.height)));
    const offset = 4 * (y * entry.width + x);
    const name = entry.names[entry.data[offset]];
    if (name === undefined) {
      tip.hidden = true;
      return;
    }
    tip.textContent = `${name}: p = ${(entry.data[offset + 1] / 255).toFixed(2)}`;
    tip.style.left = `${event.clientX - box.left + 14}px`;
    tip.style.top = `${event.clientY - box.top + 14}px`;
    tip.hidden = false;
  }

  document.addEventListener("mousemove", show);
  window.zegkitHover = true; // lets tests see that the script is on the page
})();

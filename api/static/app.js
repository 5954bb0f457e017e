// tileseg web pages: live job progress (polls the JSON API) and the mask opacity control. No build step.
"use strict";

const TERMINAL = ["succeeded", "failed", "partial", "cancelled"];

function pollJob(card) {
  const url = card.dataset.poll;
  let delay = 1000;
  const set = (field, value) => {
    card.querySelectorAll(`[data-field="${field}"]`).forEach((el) => { el.textContent = value; });
  };
  const tick = async () => {
    try {
      const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.status === 401) { window.location.reload(); return; }  // signed out: the page redirects
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const job = await r.json();
      delay = 1000;
      set("status", job.status);
      card.querySelectorAll(".badge[data-field=status]").forEach((el) => { el.className = `badge s-${job.status}`; });
      set("items_done", job.items_done);
      set("items_total", job.items_total);
      set("items_failed", job.items_failed);
      const bar = card.querySelector("#job-progress");
      if (bar) bar.value = job.progress;
      const err = card.querySelector("[data-field=error]");
      if (err) { err.textContent = job.error || ""; err.hidden = !job.error; }
      if (TERMINAL.includes(job.status)) {
        // The server renders metrics and items of a finished job; one reload shows them.
        card.dataset.done = "1";
        window.setTimeout(() => window.location.reload(), 300);
        return;
      }
    } catch (e) {
      delay = Math.min(delay * 2, 10000);  // server restarting or network gone: back off, keep trying
    }
    window.setTimeout(tick, delay);
  };
  window.setTimeout(tick, delay);
}

function opacityControl(box) {
  const slider = box.querySelector(".opacity-slider");
  const out = box.querySelector(".opacity-value");
  const toggle = box.querySelector(".opacity-toggle");
  // A slider on the job page drives every thumbnail; on an item page, the one viewer.
  const scope = box.closest("section") || document;
  let last = Number(slider.value) || 60;
  const apply = (v) => {
    slider.value = v;
    out.textContent = `${v} %`;
    scope.querySelectorAll(".layer-top").forEach((img) => { img.style.opacity = String(v / 100); });
    toggle.textContent = v > 0 ? "Hide mask" : "Show mask";
    toggle.setAttribute("aria-pressed", v > 0 ? "true" : "false");
  };
  slider.addEventListener("input", () => { last = Number(slider.value) || last; apply(Number(slider.value)); });
  toggle.addEventListener("click", () => apply(Number(slider.value) > 0 ? 0 : (last || 60)));
  apply(Number(slider.value));
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-poll]").forEach(pollJob);
  document.querySelectorAll(".opacity").forEach(opacityControl);
});

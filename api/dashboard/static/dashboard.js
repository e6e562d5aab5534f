// conveyor dashboard: the little that needs a script (live logs, confirming a cancel).
"use strict";

function followLogs(box) {
  const url = box.dataset.stream;
  const state = document.getElementById("stream-state");
  if (!url || !window.EventSource) return;
  const source = new EventSource(url);
  source.addEventListener("log", (event) => {
    const line = JSON.parse(event.data);
    if (box.querySelector(`[data-seq="${line.seq}"]`)) return;
    const row = document.createElement("div");
    row.className = `line l-${line.level}`;
    row.dataset.seq = line.seq;
    for (const [cls, text] of [["ts", line.ts.replace("T", " ").slice(0, 19)],
                               ["lvl", line.level], ["msg", line.message]]) {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      row.append(span, " ");
    }
    if (line.fields) {
      const span = document.createElement("span");
      span.className = "fields";
      span.textContent = JSON.stringify(line.fields);
      row.append(span);
    }
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    box.append(row);
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
  source.addEventListener("end", (event) => {
    source.close();
    const end = JSON.parse(event.data);
    if (state) state.textContent = `The run ended: ${end.status}. Reload for its final state.`;
  });
  source.addEventListener("error", () => {
    if (state && source.readyState === EventSource.CLOSED) state.textContent = "Live logs stopped.";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("logs");
  if (box) {
    box.scrollTop = box.scrollHeight;
    followLogs(box);
  }
  const refresh = document.querySelector("[data-refresh-s]");
  if (refresh) {
    // The overview is a snapshot: read it again, unless the tab is in the background.
    window.setInterval(() => {
      if (document.visibilityState === "visible") window.location.reload();
    }, 1000 * Number(refresh.dataset.refreshS));
  }
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
});

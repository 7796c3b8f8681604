// petals swarm health: refreshes the page's body from the server's last reading (the server renders and escapes
// it; this script only swaps it in) and keeps the age of the reading current. Without JavaScript the page reloads.
"use strict";
(function () {
  const main = document.getElementById("health");
  if (!main) return;
  const period = Math.max(1, Number(main.dataset.period) || 5) * 1000;
  let failed = false;

  function tickAge() {
    const time = main.querySelector("time[data-taken]");
    const age = main.querySelector(".age");
    if (!time || !age) return;
    const seconds = Math.max(0, Math.round(Date.now() / 1000 - Number(time.dataset.taken)));
    age.textContent = ` (${seconds} s ago)`;
  }

  async function refresh() {
    try {
      const response = await fetch(main.dataset.fragment, { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      main.innerHTML = await response.text();
      failed = false;
    } catch (error) {
      if (!failed) {
        const note = document.createElement("p");
        note.className = "alert";
        note.textContent = `This page's server did not answer (${error.message}); retrying.`;
        main.prepend(note);
      }
      failed = true;
    }
    main.dataset.refreshed = String(Date.now());
    tickAge();
  }

  tickAge();
  setInterval(tickAge, 1000);
  setInterval(refresh, period);
})();

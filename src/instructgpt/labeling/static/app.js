// instructgpt labeling: keyboard shortcuts, drag-and-drop ranking, demonstration drafts.
// Served from the package (no CDN). It never inserts HTML: untrusted text stays in the server-escaped DOM, and the
// script only moves elements and sets textContent / input values. Without it, the pages work with plain forms.
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  // After a submit the server redirects with ?submitted=ID: that task's draft is safely stored, drop it.
  const params = new URLSearchParams(location.search);
  if (params.has("submitted")) {
    try { localStorage.removeItem("igpt-draft-" + params.get("submitted")); } catch (e) { /* storage disabled */ }
    history.replaceState(null, "", location.pathname);
  }

  const form = document.getElementById("task-form");
  if (!form) return;
  const submitButton = document.getElementById("submit");

  function isTyping(el) {
    if (!el) return false;
    if (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT") return true;
    return el.tagName === "INPUT" && !["radio", "checkbox", "button", "submit"].includes(el.type);
  }

  // One submission per page: a second Enter or click while the first is in flight does nothing.
  let submitting = false;
  form.addEventListener("submit", function (e) {
    if (submitting) { e.preventDefault(); return; }
    submitting = true;
  });

  if (form.classList.contains("demonstration")) setupDemonstration();
  else setupRanking();

  function setupDemonstration() {
    const area = form.querySelector("textarea");
    const key = "igpt-draft-" + form.dataset.taskId;
    try { if (!area.value) area.value = localStorage.getItem(key) || ""; } catch (e) { /* storage disabled */ }
    let timer = null;
    area.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { try { localStorage.setItem(key, area.value); } catch (e) { /* full */ } }, 300);
    });
    document.addEventListener("keydown", function (e) {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        form.requestSubmit(submitButton);
      }
    });
  }

  function setupRanking() {
    const cards = Array.from(form.querySelectorAll(".output"));  // display order: A, B, C ...
    const list = document.getElementById("rank-list");
    const tieNote = document.getElementById("tie-note");
    const itemOf = {};
    list.querySelectorAll(".rank-item").forEach(function (li) { itemOf[li.dataset.index] = li; });
    const rankInput = function (idx) { return form.querySelector('input[name="rank_' + idx + '"]'); };
    const ratingOf = function (idx) {
      const r = form.querySelector('input[name="rating_' + idx + '"]:checked');
      return r ? parseInt(r.value, 10) : 0;
    };
    let current = 0;

    // Start from the rank inputs when the server sent them back filled (a re-shown form), else display order.
    const given = cards.map(function (c) { return parseInt(rankInput(c.dataset.index).value, 10); });
    if (given.every(function (n) { return n >= 1; })) {
      const order = cards.map(function (c, pos) { return { idx: c.dataset.index, rank: given[pos], pos: pos }; })
        .sort(function (a, b) { return a.rank - b.rank || a.pos - b.pos; });
      order.forEach(function (o, n) {
        const li = itemOf[o.idx];
        li.classList.toggle("tied", n > 0 && order[n - 1].rank === o.rank);
        list.appendChild(li);
      });
    }

    // The list is the truth; write it into the rank inputs (dense ranks, tied items share a number).
    function sync() {
      let rank = 0;
      Array.from(list.children).forEach(function (li, pos) {
        if (pos === 0) li.classList.remove("tied");
        const tied = li.classList.contains("tied");
        if (!tied) rank += 1;
        li.querySelector(".rank-no").textContent = String(rank);
        li.querySelector(".tie").setAttribute("aria-pressed", tied ? "true" : "false");
        rankInput(li.dataset.index).value = String(rank);
        const rating = ratingOf(li.dataset.index);
        li.querySelector(".chip-rating").textContent = rating ? rating + "/7" : "";
      });
      tieNote.hidden = !(rank === 1 && cards.length > 1);
    }

    function setCurrent(pos, scroll) {
      current = Math.max(0, Math.min(cards.length - 1, pos));
      cards.forEach(function (c, n) {
        c.classList.toggle("current", n === current);
        itemOf[c.dataset.index].classList.toggle("current", n === current);
      });
      if (scroll) {
        cards[current].focus({ preventScroll: true });
        cards[current].scrollIntoView({ block: "nearest", behavior: "smooth" });
      }
    }

    // Moving an output unties it from its old and new neighbours: a move never creates or keeps a tie silently.
    function untie(li) { if (li) li.classList.remove("tied"); }
    function place(li, before) {
      untie(li); untie(li.nextElementSibling);
      list.insertBefore(li, before);
      untie(li); untie(li.nextElementSibling);
      sync();
    }
    function move(idx, delta) {
      const li = itemOf[idx];
      if (delta < 0 && li.previousElementSibling) place(li, li.previousElementSibling);
      else if (delta > 0 && li.nextElementSibling) place(li, li.nextElementSibling.nextElementSibling);
    }
    function toggleTie(idx) {
      const li = itemOf[idx];
      if (li.previousElementSibling) { li.classList.toggle("tied"); sync(); }
    }
    // Best rating first; equal ratings tied; unrated outputs last, in their current order.
    function orderByRating() {
      const items = Array.from(list.children).map(function (li, pos) {
        return { li: li, rating: ratingOf(li.dataset.index), pos: pos };
      }).sort(function (a, b) { return b.rating - a.rating || a.pos - b.pos; });
      items.forEach(function (it, n) {
        it.li.classList.toggle("tied", n > 0 && it.rating > 0 && items[n - 1].rating === it.rating);
        list.appendChild(it.li);
      });
      sync();
    }
    function submit() {
      const unrated = cards.findIndex(function (c) { return !ratingOf(c.dataset.index); });
      if (unrated >= 0) {
        setCurrent(unrated, true);
        const first = cards[unrated].querySelector('input[type="radio"]');
        first.setCustomValidity("Rate output " + cards[unrated].dataset.label + " (1–7) before submitting.");
        first.reportValidity();
        first.addEventListener("change", function () { first.setCustomValidity(""); }, { once: true });
        return;
      }
      sync();
      form.requestSubmit(submitButton);
    }

    form.addEventListener("change", function (e) {
      if (e.target.type === "radio") e.target.form.querySelectorAll('input[name="' + e.target.name + '"]')
        .forEach(function (r) { r.setCustomValidity(""); });
      sync();
    });
    form.addEventListener("submit", sync);
    cards.forEach(function (c, pos) { c.addEventListener("pointerdown", function () { setCurrent(pos, false); }); });
    list.addEventListener("click", function (e) {
      const li = e.target.closest(".rank-item");
      if (!li) return;
      if (e.target.closest(".tie")) { toggleTie(li.dataset.index); return; }
      setCurrent(cards.indexOf(form.querySelector('.output[data-index="' + li.dataset.index + '"]')), true);
    });
    document.getElementById("order-by-rating").addEventListener("click", orderByRating);

    // Drag and drop (HTML5): drop above or below the item under the pointer.
    let dragged = null;
    function clearMarks() {
      list.querySelectorAll(".drop-before, .drop-after, .dragging").forEach(function (el) {
        el.classList.remove("drop-before", "drop-after", "dragging");
      });
    }
    function dropTarget(e) {
      const li = e.target.closest && e.target.closest(".rank-item");
      if (!li || li === dragged) return null;
      const box = li.getBoundingClientRect();
      return { li: li, before: e.clientY < box.top + box.height / 2 };
    }
    list.addEventListener("dragstart", function (e) {
      dragged = e.target.closest(".rank-item");
      if (!dragged) return;
      dragged.classList.add("dragging");
      e.dataTransfer.effectAllowed = "move";
      e.dataTransfer.setData("text/plain", dragged.dataset.label);
    });
    list.addEventListener("dragover", function (e) {
      if (!dragged) return;
      e.preventDefault();
      list.querySelectorAll(".drop-before, .drop-after").forEach(function (el) {
        el.classList.remove("drop-before", "drop-after");
      });
      const t = dropTarget(e);
      if (t) t.li.classList.add(t.before ? "drop-before" : "drop-after");
    });
    list.addEventListener("drop", function (e) {
      e.preventDefault();
      const t = dropTarget(e);
      if (dragged && t) place(dragged, t.before ? t.li : t.li.nextElementSibling);
      clearMarks();
      dragged = null;
    });
    list.addEventListener("dragend", function () { clearMarks(); dragged = null; });

    document.addEventListener("keydown", function (e) {
      if (e.defaultPrevented || e.altKey || e.ctrlKey || e.metaKey || isTyping(e.target)) return;
      const idx = cards[current].dataset.index;
      const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
      if (e.shiftKey && key === "ArrowUp") move(idx, -1);
      else if (e.shiftKey && key === "ArrowDown") move(idx, 1);
      else if (/^[1-7]$/.test(key)) {
        form.querySelector('input[name="rating_' + idx + '"][value="' + key + '"]').checked = true;
        sync();
      }
      else if (key === "j") setCurrent(current + 1, true);
      else if (key === "k") setCurrent(current - 1, true);
      else if (key === "t" || key === "=") toggleTie(idx);
      else if (key === "s") orderByRating();
      else if (key === "f") cards[current].querySelector(".flags input").focus();  // then Tab / Space
      else if (key === "?") { const d = form.querySelector("details.keys"); d.open = !d.open; }
      else if (key === "Enter") {
        // Enter on a button, link or summary keeps its own meaning (e.g. Skip).
        if (["BUTTON", "A", "SUMMARY"].includes(e.target.tagName)) return;
        submit();
      }
      else return;
      e.preventDefault();
    });

    setCurrent(0, false);
    sync();
  }
})();

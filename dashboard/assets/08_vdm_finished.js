/*
 * vdm-hub dashboard: the Finished view (`/dashboard/finished`) — find any recent request.
 *
 * A form (request id prefix, worker, model, outcome, status, finished since/until) searches
 * the stream service's `GET /metrics/completed`; the answer fills the grid below, newest first,
 * and "Load more" continues from the answer's `next` cursor (the service examines a bounded
 * number of entries per call, so a rare match may take a few). The search lives in the page
 * URL (`/dashboard/finished?request=9f3c&outcome=error`), like the live grid's view, so a link
 * shows the same search. A row click opens the same detail panel as a live row
 * (VdmOperator.openEntry), and so does a row of Recently finished on the live page.
 *
 * The form is plain DOM built into a placeholder of the layout (React never re-renders it);
 * the query building and the URL are pure functions in 01_vdm_viewcore.js.
 */
(function () {
  "use strict";
  const core = window.VdmCore;
  const view = window.VdmViewCore;
  const cfg = window.__vdmConfig || {};
  const GRID_ID = "vdm-finished-grid";
  const RECENT_GRID_ID = "vdm-recent-grid";
  const PAGE_SIZE = 100;

  const FIELDS = [
    { param: "request", label: "Request ID", placeholder: "prefix", type: "text" },
    { param: "worker", label: "Worker", placeholder: "exact", type: "text" },
    { param: "model", label: "Model", placeholder: "exact", type: "text" },
    { param: "outcome", label: "Outcome", type: "select" },
    { param: "status", label: "Status", placeholder: "e.g. 502", type: "text" },
    { param: "since", label: "Finished after", type: "datetime-local" },
    { param: "until", label: "Finished before", type: "datetime-local" },
  ];

  let form = null;
  let moreButton = null;
  let current = null; // {values, search, next, count}
  let answeredOk = false;
  let loading = false;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // datetime-local inputs speak local wall-clock time; the URL and the API epoch seconds.
  function toLocalInput(epochS) {
    const t = Number(epochS);
    if (!epochS || !Number.isFinite(t)) return "";
    const d = new Date(t * 1000 - new Date(t * 1000).getTimezoneOffset() * 60000);
    return d.toISOString().slice(0, 19);
  }

  function fromLocalInput(text) {
    if (!text) return "";
    const ms = new Date(text).getTime();
    return Number.isFinite(ms) ? String(Math.floor(ms / 1000)) : "";
  }

  function buildForm(box) {
    form = el("form", "vdm-finished-fields");
    form.id = "vdm-finished-search";
    for (const f of FIELDS) {
      const label = el("label", "vdm-field");
      label.append(el("span", "vdm-field-label", f.label));
      let input;
      if (f.type === "select") {
        input = el("select", "vdm-input");
        input.append(new Option("any", ""));
        for (const outcome of view.OUTCOMES) input.append(new Option(outcome, outcome));
      } else {
        input = el("input", "vdm-input");
        input.type = f.type;
        if (f.type === "datetime-local") input.step = "1";
        if (f.placeholder) input.placeholder = f.placeholder;
        input.autocomplete = "off";
      }
      input.name = f.param;
      input.id = "vdm-finished-field-" + f.param;
      label.append(input);
      form.append(label);
    }
    const buttons = el("div", "vdm-field vdm-field-buttons");
    const search = el("button", "vdm-button", "Search");
    search.type = "submit";
    search.id = "vdm-finished-submit";
    const clear = el("button", "vdm-button vdm-button-quiet", "Clear");
    clear.type = "button";
    clear.addEventListener("click", function () {
      fillForm(view.finishedFromSearch(""));
      runSearch();
    });
    buttons.append(search, clear);
    form.append(buttons);
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      runSearch();
    });
    box.append(form);
  }

  function buildActions(box) {
    moreButton = el("button", "vdm-button", "Load more");
    moreButton.type = "button";
    moreButton.id = "vdm-finished-more";
    moreButton.hidden = true;
    moreButton.addEventListener("click", loadMore);
    box.append(moreButton);
  }

  function fillForm(values) {
    for (const f of FIELDS) {
      const input = form.elements[f.param];
      const value = values[f.param] || "";
      input.value = f.type === "datetime-local" ? toLocalInput(value) : value;
    }
  }

  function formValues() {
    const values = {};
    for (const f of FIELDS) {
      const raw = form.elements[f.param].value;
      values[f.param] = f.type === "datetime-local" ? fromLocalInput(raw) : raw;
    }
    return view.finishedFromSearch(view.finishedToSearch(values)); // cleaned like the URL's
  }

  function setStatus(text, bad) {
    const node = document.getElementById("vdm-finished-status");
    if (!node) return;
    node.textContent = text;
    node.className = "vdm-finished-status" + (bad ? " vdm-bad" : "");
  }

  function fetchPage(values, before) {
    const url = core.joinUrl(cfg.streamUrl, view.completedQuery(values, before, PAGE_SIZE));
    return fetch(url, {
      cache: "no-store",
      credentials: cfg.withCredentials ? "include" : "same-origin",
    }).then(function (r) {
      return r
        .json()
        .catch(() => null)
        .then(function (body) {
          if (r.ok && body && Array.isArray(body.entries)) return body;
          const detail = body && body.message ? body.message : "HTTP " + r.status;
          throw new Error(detail);
        });
    });
  }

  function gridApi() {
    return window.VdmDom.gridApi(GRID_ID);
  }

  function show(entries, append) {
    const api = gridApi();
    if (!api) return false;
    if (append) api.applyTransaction({ add: entries });
    else api.setGridOption("rowData", entries);
    return true;
  }

  /** An answer to the search `mine`; dropped when another search has started since. */
  function answered(mine, body, append) {
    if (mine !== current) return;
    answeredOk = true;
    if (!show(body.entries, append)) {
      window.setTimeout(() => answered(mine, body, append), 100); // grid not mounted yet
      return;
    }
    current.next = body.next || null;
    current.count += body.entries.length;
    moreButton.hidden = !current.next;
    setStatus(view.finishedStatus(current.count, current.next, body.scanned), false);
  }

  function failed(err) {
    answeredOk = false;
    setStatus("The search failed: " + err.message, true);
  }

  function runSearch() {
    const values = formValues();
    const search = view.finishedToSearch(values);
    current = { values: values, search: search, next: null, count: 0 };
    if (view.pageOf(window.location.pathname) === "finished" && window.location.search !== search) {
      window.history.replaceState(window.history.state, "", window.location.pathname + search);
    }
    moreButton.hidden = true;
    setStatus("Searching…", false);
    loading = true;
    const mine = current;
    fetchPage(values, null)
      .then((body) => answered(mine, body, false))
      .catch((err) => mine === current && failed(err))
      .finally(() => (loading = false));
  }

  function loadMore() {
    if (!current || !current.next || loading) return;
    loading = true;
    moreButton.disabled = true;
    const mine = current;
    fetchPage(current.values, current.next)
      .then((body) => answered(mine, body, true))
      .catch((err) => mine === current && failed(err))
      .finally(function () {
        loading = false;
        moreButton.disabled = false;
      });
  }

  /** Shown (a load, a link, the nav): search what the URL says, or put the last search back
   * into a URL that lost it (a nav link drops the query). */
  function onShown() {
    if (view.pageOf(window.location.pathname) !== "finished" || !form) return;
    const search = window.location.search;
    if (current && (search === current.search || search === "")) {
      if (search !== current.search) {
        const url = window.location.pathname + current.search;
        window.history.replaceState(window.history.state, "", url);
      }
      return;
    }
    fillForm(view.finishedFromSearch(search));
    runSearch();
  }

  function openOnClick(gridId) {
    const dag = window.dash_ag_grid;
    if (!dag || !document.getElementById(gridId)) {
      window.setTimeout(() => openOnClick(gridId), 100);
      return;
    }
    dag.getApiAsync(gridId).then(function (api) {
      api.addEventListener("rowClicked", function (ev) {
        if (ev && ev.data && window.VdmOperator) window.VdmOperator.openEntry(ev.data);
      });
    });
  }

  function start() {
    const box = document.getElementById("vdm-finished-form");
    const actions = document.getElementById("vdm-finished-actions");
    if (!box || !actions) {
      window.setTimeout(start, 100); // the layout is not rendered yet
      return;
    }
    if (!form) {
      buildForm(box);
      buildActions(actions);
    }
    onShown();
    openOnClick(GRID_ID);
    openOnClick(RECENT_GRID_ID);
  }

  window.addEventListener("vdm:locationchange", () => window.setTimeout(onShown, 0));
  window.addEventListener("popstate", () => window.setTimeout(onShown, 0));
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();

  window.VdmFinished = {
    /** For the header emoji: the last search was answered. */
    fresh: () => answeredOk,
    search: () => runSearch(),
  };
})();

/*
 * vdm-hub dashboard: what an operator does with a row on the Active Requests page.
 *
 * - Reads `GET <stream>/metrics/capabilities` once per page load (retried while it cannot be
 *   read): whether the stream service allows cancelling, and after how long a row is stuck.
 * - A row click opens a detail panel: every field of the row, its timings, its worker, and,
 *   when cancel is enabled and the row's worker can stop its requests, a Cancel button
 *   (confirmation, `POST …/{request_id}/cancel?worker_id=…`, so exactly that row is cancelled
 *   even when another worker holds the same request id; a short notice with the answer). The
 *   panel follows the row (by its `key`) live and says when it ended.
 *   `VdmOperator.openEntry(entry)` shows a finished request's completed entry in the same
 *   panel (the Finished view and Recently finished, 08_vdm_finished.js).
 * - The grid's filters and sort are mirrored into the page URL (`?model=…&worker=…&sort=…`)
 *   with history.replaceState and restored from it on load, so a link shows the same view.
 *   The live client re-evaluates its connection on replaceState; only the query changes
 *   here, so the stream stays open.
 *
 * The decisions are pure functions in 01_vdm_opcore.js; this file is the DOM around them.
 * The panel and the notice are plain elements appended to <body>, outside React's tree.
 */
(function () {
  "use strict";
  const core = window.VdmCore;
  const op = window.VdmOpCore;
  const dom = window.VdmDom;
  const cfg = window.__vdmConfig || {};
  const GRID_ID = "vdm-active-grid";
  const CAPS_RETRY_MS = 5000;

  function credentials() {
    // Like every other call to the stream service: the session cookie when access control is
    // on (cross-origin needs "include"), never with a '*' CORS policy, which refuses it.
    return cfg.withCredentials ? "include" : "same-origin";
  }

  // ---- capabilities -----------------------------------------------------------------------

  let capsKnown = false;
  let capsLoading = false;
  let capsTriedAt = 0;

  function loadCapabilities() {
    if (capsKnown || capsLoading || Date.now() - capsTriedAt < CAPS_RETRY_MS) return;
    capsLoading = true;
    capsTriedAt = Date.now();
    fetch(core.joinUrl(cfg.streamUrl, op.CAPABILITIES_PATH), {
      cache: "no-store",
      credentials: credentials(),
    })
      .then(function (r) {
        if (r.status === 404) return {}; // a stream service without operator features
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (body) {
        window.__vdmCaps = op.capabilitiesFrom(body);
        capsKnown = true;
        renderPanel();
      })
      .catch(function () {
        /* down or logged out: tried again on the next paint after CAPS_RETRY_MS */
      })
      .finally(function () {
        capsLoading = false;
      });
  }

  // ---- notice -----------------------------------------------------------------------------

  let notice = null;
  let noticeTimer = null;

  function showNotice(kind, text) {
    if (!notice) {
      notice = el("div", "vdm-notice");
      notice.id = "vdm-notice";
      notice.setAttribute("role", "status");
      notice.setAttribute("aria-live", "polite");
      document.body.appendChild(notice);
    }
    notice.textContent = text;
    notice.className = "vdm-notice vdm-notice-shown vdm-notice-" + kind;
    notice.dataset.kind = kind;
    if (noticeTimer) window.clearTimeout(noticeTimer);
    noticeTimer = window.setTimeout(function () {
      notice.className = "vdm-notice";
    }, 8000);
  }

  // ---- detail panel -----------------------------------------------------------------------

  let panel = null;
  let openId = null; // the open row's key
  let lastRow = null; // the row as last seen, kept on screen after it ended
  let finishedEntry = null; // a completed entry shown as it is (Finished view, Recently finished)
  let cancelState = null; // {id, text} once a cancel was asked for the open row

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function buildPanel() {
    panel = el("aside", "vdm-detail");
    panel.id = "vdm-detail";
    panel.setAttribute("role", "dialog");
    panel.setAttribute("aria-labelledby", "vdm-detail-title");
    panel.hidden = true;
    const head = el("div", "vdm-detail-head");
    const title = el("h2", "vdm-detail-title", "Request");
    title.id = "vdm-detail-title";
    const close = el("button", "vdm-detail-close", "×");
    close.type = "button";
    close.id = "vdm-detail-close";
    close.setAttribute("aria-label", "Close details");
    close.addEventListener("click", closePanel);
    head.append(title, close);
    const state = el("div", "vdm-detail-state");
    state.id = "vdm-detail-state";
    const body = el("div", "vdm-detail-body");
    body.id = "vdm-detail-body";
    const actions = el("div", "vdm-detail-actions");
    const cancel = el("button", "vdm-button vdm-button-danger", "Cancel request");
    cancel.type = "button";
    cancel.id = "vdm-detail-cancel";
    cancel.addEventListener("click", onCancelClick);
    actions.append(cancel);
    panel.append(head, state, body, actions);
    document.body.appendChild(panel);
    document.addEventListener("keydown", function (ev) {
      if (ev.key === "Escape" && openId !== null) closePanel();
    });
  }

  function openPanel(key) {
    if (!panel) buildPanel();
    openId = String(key);
    lastRow = window.VdmLive ? window.VdmLive.row(openId) || null : null;
    finishedEntry = null;
    cancelState = null;
    panel.hidden = false;
    renderPanel();
  }

  /** The same panel for a request that has finished: its completed entry, as it is. */
  function openEntry(entry) {
    if (!entry || typeof entry !== "object") return;
    openPanel(entry.request_id);
    finishedEntry = entry;
    renderPanel();
  }

  function closePanel() {
    openId = null;
    lastRow = null;
    finishedEntry = null;
    if (panel) panel.hidden = true;
  }

  let renderedRow = null;
  let renderedAt = 0;

  /** Redraw the open panel; `onlyIfChanged` skips it when neither the row nor a second moved. */
  function renderPanel(onlyIfChanged) {
    if (!panel || openId === null) return;
    if (finishedEntry) {
      if (!onlyIfChanged || renderedRow !== finishedEntry) renderFinished(finishedEntry);
      renderedRow = finishedEntry; // an entry does not change: drawn once
      return;
    }
    const live = window.VdmLive ? window.VdmLive.row(openId) : undefined;
    if (live) lastRow = live;
    const now = Date.now();
    if (onlyIfChanged && live === renderedRow && now - renderedAt < 1000) return;
    renderedRow = live;
    renderedAt = now;
    const row = lastRow || {};
    const worker = window.VdmLive ? window.VdmLive.worker(row.worker_id) : null;
    const offset = window.__vdmClock ? window.__vdmClock.offsetMs : 0;
    const rate = window.dashAgGridFunctions.vdmChunkRate({ data: row });
    const sections = op.detailSections(row, worker, now, offset, core, rate);
    fillPanel(row, sections);
    let stateText = "";
    if (!live) stateText = "This request is no longer in flight.";
    else if (cancelState && cancelState.id === openId) stateText = cancelState.text;
    else if (window.dashAgGridFunctions.vdmIsStuck({ data: row })) {
      stateText = "Stuck: running longer than " + core.formatDuration(window.__vdmCaps.stuckAfterS * 1000) + ".";
    } else if (window.dashAgGridFunctions.vdmIsStalled({ data: row })) {
      stateText = "Stalled: no output for longer than " + core.formatDuration(window.__vdmCaps.stallAfterS * 1000) + " after its first token.";
    }
    showState(stateText);
    const cancel = document.getElementById("vdm-detail-cancel");
    cancel.hidden = !op.cancelOffered(window.__vdmCaps, worker);
    cancel.disabled = !live;
  }

  function renderFinished(entry) {
    const sections = op.detailSections(entry, null, Date.now(), 0, core, null);
    const rate = window.VdmViewCore.tokensPerS(entry);
    const timings = sections.find((s) => s.title === "Timings");
    if (timings) timings.items.push(["Tokens / s", window.VdmViewCore.tokensPerSText(rate, core.formatRate)]);
    fillPanel(entry, sections);
    showState("Finished: " + entry.outcome + (entry.status ? ", HTTP " + entry.status : "") + ".");
    document.getElementById("vdm-detail-cancel").hidden = true;
  }

  function showState(text) {
    const state = document.getElementById("vdm-detail-state");
    state.textContent = text;
    state.className = "vdm-detail-state" + (text ? " vdm-detail-state-shown" : "");
  }

  function fillPanel(row, sections) {
    document.getElementById("vdm-detail-title").textContent =
      (row.model ? row.model + " · " : "") + (row.method || "") + " " + (row.path || "");
    const body = document.getElementById("vdm-detail-body");
    body.replaceChildren();
    for (const section of sections) {
      body.append(el("h3", "vdm-detail-section", section.title));
      const list = el("dl", "vdm-detail-list");
      for (const [label, text] of section.items) {
        const dt = el("dt", "", label);
        const dd = el("dd", "", text);
        dd.dataset.field = label;
        list.append(dt, dd);
      }
      body.append(list);
    }
  }

  function onCancelClick() {
    const id = openId;
    const row = id === null ? null : window.VdmLive.row(id);
    if (!row || !op.cancelOffered(window.__vdmCaps, window.VdmLive.worker(row.worker_id))) return;
    const what = (row.model || "request") + " on " + (row.worker_id || "its worker");
    const question =
      "Cancel request " + row.request_id + " (" + what + ")?\n\n" +
      "The worker aborts the upstream call; the client gets an aborted response.";
    if (!window.confirm(question)) return;
    postCancel(id, row);
  }

  // `id` is the row's key; the request goes to the row's own worker (`worker_id`).
  function postCancel(id, row) {
    const button = document.getElementById("vdm-detail-cancel");
    if (button) button.disabled = true;
    fetch(core.joinUrl(cfg.streamUrl, op.cancelPath(row.request_id, row.worker_id)), {
      method: "POST",
      cache: "no-store",
      credentials: credentials(),
    })
      .then(function (r) {
        return r
          .json()
          .catch(function () {
            return null;
          })
          .then(function (body) {
            return { status: r.status, body: body };
          });
      })
      .catch(function () {
        return { status: 0, body: null };
      })
      .then(function (answer) {
        const result = op.cancelNotice(answer.status, answer.body, row.request_id);
        const where = row.request_id + " on " + row.worker_id;
        console.info("[vdm] cancel " + where + ": HTTP " + answer.status);
        showNotice(result.kind, result.text);
        if (openId === id) {
          cancelState = { id: id, text: result.text };
          renderPanel();
        }
      });
  }

  // ---- the grid view in the URL -----------------------------------------------------------

  function onMetricsPage() {
    return String(window.location.pathname).includes(core.METRICS_PATH);
  }

  function sortOf(api) {
    return api
      .getColumnState()
      .filter((c) => c.sort)
      .sort((a, b) => (a.sortIndex || 0) - (b.sortIndex || 0))
      .map((c) => ({ colId: c.colId, sort: c.sort }));
  }

  let viewApi = null;
  // The filter the page's URL asked for, held until someone touches the grid. dash-ag-grid
  // re-applies its own `filterModel` prop, and a copy of it older than our restore (its first
  // render's empty one) can land after the restore and clear it, seen under load: until the
  // user has acted on the grid, no filter change can be theirs, so such a change is undone.
  let urlFilter = null;

  function writeUrl() {
    if (!viewApi || !onMetricsPage()) return;
    const search = op.viewToSearch(window.location.search, viewApi.getFilterModel(), sortOf(viewApi));
    if (search === window.location.search) return;
    const url = window.location.pathname + search + window.location.hash;
    window.history.replaceState(window.history.state, "", url);
  }

  function restoreView(api) {
    if (!onMetricsPage()) return;
    const view = op.searchToView(window.location.search);
    if (Object.keys(view.filterModel).length) {
      // Through the grid component's own `filterModel` prop as well: dash-ag-grid re-applies
      // that prop after every row update, so a copy that lagged behind the grid (it follows
      // filterChanged events through Dash's store) would undo part of the restored view.
      dom.setProps(GRID_ID, { filterModel: view.filterModel });
      api.setFilterModel(view.filterModel);
      urlFilter = view.filterModel;
    }
    if (view.sort !== null) {
      api.applyColumnState({
        state: view.sort.map((s, i) => ({ colId: s.colId, sort: s.sort, sortIndex: i })),
        defaultState: { sort: null },
      });
    }
  }

  /** Keep the URL's filter against changes nobody asked for, until the user acts on the grid. */
  function holdUrlFilter(api) {
    const grid = document.getElementById(GRID_ID);
    const release = function () {
      urlFilter = null;
    };
    if (grid) {
      for (const type of ["pointerdown", "keydown", "input"]) {
        grid.addEventListener(type, release, { capture: true, once: true });
      }
    }
    // Compared as the URL writes them (key order and defaults aside); a few times at most, so
    // that a model the grid cannot hold as given can never make this loop.
    let undone = 0;
    api.addEventListener("filterChanged", function () {
      if (urlFilter === null || undone >= 5) return;
      const wanted = op.viewToSearch("", urlFilter, []);
      if (op.viewToSearch("", api.getFilterModel(), []) !== wanted) {
        undone += 1;
        api.setFilterModel(urlFilter);
      }
    });
  }

  // ---- wiring -----------------------------------------------------------------------------

  function attachGrid() {
    const dag = window.dash_ag_grid;
    if (!dag || !document.getElementById(GRID_ID)) {
      window.setTimeout(attachGrid, 100);
      return;
    }
    dag.getApiAsync(GRID_ID).then(function (api) {
      restoreView(api);
      viewApi = api;
      holdUrlFilter(api);
      api.addEventListener("filterChanged", writeUrl);
      api.addEventListener("sortChanged", writeUrl);
      api.addEventListener("rowClicked", function (ev) {
        const key = ev ? core.rowId(ev.data) : null;
        if (key !== null) openPanel(key);
      });
      writeUrl();
    });
  }

  // Coming back to the metrics page through a nav link drops the query: put the view back.
  window.addEventListener("vdm:locationchange", function () {
    window.setTimeout(writeUrl, 0);
  });
  window.addEventListener("popstate", function () {
    window.setTimeout(writeUrl, 0);
  });

  if (window.VdmLive) {
    window.VdmLive.onPaint(function () {
      renderPanel(true);
      if (!capsKnown) loadCapabilities();
    });
  }
  window.setInterval(function () {
    if (openId !== null && document.visibilityState === "visible") renderPanel(true);
  }, 1000);

  function start() {
    loadCapabilities();
    attachGrid();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();

  window.VdmOperator = {
    open: openPanel,
    openEntry: openEntry,
    close: closePanel,
    capabilitiesKnown: () => capsKnown,
  };
})();

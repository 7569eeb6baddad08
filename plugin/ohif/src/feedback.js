/**
 * Relevance feedback in the "Similar cases" panel: 👍 / 👎 on each hit (POST /api/v1/feedback, stored in the
 * index's catalog with who, when, the score and the model), and "Refine" (POST /api/v1/feedback/refine: the same
 * search with the query vector moved by the votes, Rocchio), after which the panel says "refined with N 👍 / M 👎".
 *
 * createFeedback() follows the panel controller (logic.js): when an answer for another query arrives it loads that
 * query's votes (GET /api/v1/feedback?query=SOP). A hit shows the net vote on it (all users). Clicking the pressed
 * thumb again withdraws the vote. The pure parts are exported for `node --test`; the DOM parts draw with
 * textContent only.
 */

import { fetchJson, joinUrl } from './logic.js';

export const UP = 'up';
export const DOWN = 'down';
export const NONE = 'none';

// ---- pure ---------------------------------------------------------------------------------------------------------

/** The vote to send when `clicked` (up/down) is pressed on a hit whose vote is `current`: pressing it again withdraws. */
export function nextVote(current, clicked) {
  return current === clicked ? NONE : clicked;
}

/** The JSON body of POST /feedback for the panel's query (logic.queryFromInstance) and a hit. */
export function voteRequest(query, hitSopUid, vote) {
  return { query: query.sop_uid, study_uid: query.study_uid, series_uid: query.series_uid, hit: hitSopUid, vote };
}

/** {sop: 'up'|'down'} from GET /feedback's votes: the sign of the sum of each hit's votes (ties: none). */
export function netVotes(votes) {
  const sums = {};
  for (const v of votes || []) {
    sums[v.hit_sop_uid] = (sums[v.hit_sop_uid] || 0) + (v.vote === UP ? 1 : v.vote === DOWN ? -1 : 0);
  }
  const out = {};
  for (const [sop, sum] of Object.entries(sums)) {
    if (sum) {
      out[sop] = sum > 0 ? UP : DOWN;
    }
  }
  return out;
}

/** "refined with 2 👍 / 1 👎" for the answer's `refined`, or '' for a plain search. */
export function refinedText(refined) {
  if (!refined || typeof refined.up !== 'number' || typeof refined.down !== 'number') {
    return '';
  }
  return `refined with ${refined.up} 👍 / ${refined.down} 👎`;
}

// ---- state --------------------------------------------------------------------------------------------------------

/**
 * The feedback of the panel: {model(), subscribe(listener), vote(item, up|down), refine()}.
 *   controller   the panel controller (logic.createController): its query, answer and find()
 *   fetch        window.fetch (or a fake); headers() the API headers (bearer token)
 */
export function createFeedback({ controller, fetch: fetchImpl, headers = () => ({}) }) {
  const cfg = controller.config;
  const listeners = new Set();
  let state = { querySop: '', votes: {}, error: '', busy: false };

  function set(patch) {
    state = { ...state, ...patch };
    listeners.forEach(listener => listener(state));
  }

  function answer() {
    return controller.getState().response;
  }

  async function load(querySop) {
    try {
      const found = await fetchJson(fetchImpl, joinUrl(cfg.apiRoot, `feedback?query=${encodeURIComponent(querySop)}`),
        { headers: headers(), timeoutMs: cfg.timeoutMs });
      if (state.querySop === querySop) {
        set({ votes: netVotes(found.votes) });
      }
    } catch (error) {
      // the thumbs start unpressed when the votes cannot be read
    }
  }

  controller.subscribe(() => {
    const querySop = answer()?.query?.sop_uid || '';
    if (querySop && querySop !== state.querySop) {
      set({ querySop, votes: {}, error: '' });
      load(querySop);
    }
  });

  async function vote(item, clicked) {
    const query = controller.getState().query;
    if (!query || !state.querySop) {
      return state;
    }
    const sent = nextVote(state.votes[item.sopUid], clicked);
    set({ busy: true, error: '' });
    try {
      await fetchJson(fetchImpl, joinUrl(cfg.apiRoot, 'feedback'), { method: 'POST',
        body: voteRequest({ ...query, sop_uid: state.querySop }, item.sopUid, sent), headers: headers(),
        timeoutMs: cfg.timeoutMs });
      const votes = { ...state.votes };
      if (sent === NONE) {
        delete votes[item.sopUid];
      } else {
        votes[item.sopUid] = sent;
      }
      set({ votes, busy: false });
    } catch (error) {
      set({ busy: false, error: error?.body?.error?.message || error?.message || 'the vote was not stored' });
    }
    return state;
  }

  function refine() {
    const current = controller.getState();
    return current.query
      ? controller.find(current.query, { showAnyway: current.showAnyway, path: 'feedback/refine' })
      : Promise.resolve(current);
  }

  return {
    vote,
    refine,
    model() {
      const votes = Object.values(state.votes);
      return { ...state, up: votes.filter(v => v === UP).length, down: votes.filter(v => v === DOWN).length,
        refinedText: refinedText(answer()?.refined) };
    },
    subscribe(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
  };
}

// ---- DOM ----------------------------------------------------------------------------------------------------------

function thumb(doc, item, direction, model, actions) {
  const on = model.votes[item.sopUid] === direction;
  const node = doc.createElement('button');
  node.type = 'button';
  node.className = `medsim-vote medsim-vote-${direction}${on ? ' medsim-vote-on' : ''}`;
  node.setAttribute('data-cy', `medsim-vote-${direction}`);
  node.setAttribute('aria-pressed', on ? 'true' : 'false');
  node.setAttribute('aria-label', direction === UP ? 'thumbs up' : 'thumbs down');
  node.title = direction === UP ? 'Relevant: a similar case (again: withdraw)'
    : 'Not relevant (again: withdraw)';
  node.disabled = !!model.busy;
  node.textContent = direction === UP ? '👍' : '👎';
  node.addEventListener('click', () => actions.vote(item, direction));
  return node;
}

/** 👍 and 👎 of one hit (panel.js puts them in the result row). */
export function voteButtons(doc, item, model, actions) {
  const group = doc.createElement('div');
  group.className = 'medsim-votes';
  group.setAttribute('role', 'group');
  group.setAttribute('aria-label', `feedback on result ${item.rank}`);
  group.appendChild(thumb(doc, item, UP, model, actions));
  group.appendChild(thumb(doc, item, DOWN, model, actions));
  return group;
}

/** The bar above the results: "Refine with N 👍 / M 👎", what the list shows, and a vote that failed. */
export function feedbackBar(doc, model, actions) {
  const bar = doc.createElement('div');
  bar.className = 'medsim-feedback-bar';
  bar.setAttribute('data-cy', 'medsim-feedback');
  const refine = doc.createElement('button');
  refine.type = 'button';
  refine.className = 'medsim-button';
  refine.setAttribute('data-cy', 'medsim-refine');
  refine.disabled = !(model.up || model.down) || !!model.busy;
  refine.title = 'Search again with the query moved towards the 👍 cases and away from the 👎 ones';
  refine.textContent = `Refine (${model.up} 👍 / ${model.down} 👎)`;
  refine.addEventListener('click', () => actions.refine());
  bar.appendChild(refine);
  if (model.refinedText) {
    const said = doc.createElement('span');
    said.className = 'medsim-refined';
    said.setAttribute('data-cy', 'medsim-refined');
    said.textContent = model.refinedText;
    bar.appendChild(said);
  }
  if (model.error) {
    const error = doc.createElement('span');
    error.className = 'medsim-feedback-error';
    error.setAttribute('role', 'alert');
    error.textContent = model.error;
    bar.appendChild(error);
  }
  return bar;
}

// Relevance feedback in the panel (plugin/ohif/src/feedback.js): node --test tests/plugin/
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { createController } from '../../plugin/ohif/src/logic.js';
import { createFeedback, netVotes, nextVote, refinedText, voteRequest } from '../../plugin/ohif/src/feedback.js';
import { createPanelView } from '../../plugin/ohif/src/panel.js';
import { container } from './fake-dom.mjs';

const QUERY = { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', modality: 'CR', bodyPart: '' };

function fakeFetch(routes) {
  const calls = [];
  const impl = async (url, init = {}) => {
    calls.push({ url, method: init.method || 'GET', body: init.body ? JSON.parse(init.body) : undefined });
    const answer = await routes(url, init);
    const text = JSON.stringify(answer.body);
    return { ok: answer.status >= 200 && answer.status < 300, status: answer.status, text: async () => text };
  };
  impl.calls = calls;
  return impl;
}

function answer(order, refined) {
  return { query: { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', view: 'AP', indexed: true },
    operating_point: { mode: 'top-k', k: 2 }, group_by: 'image', include_same_patient: false,
    results: order.map((sop, i) => ({ rank: i + 1, score: 0.9 - i / 10, study_uid: `7.${sop}`, series_uid: '7.0.1',
      sop_uid: sop, labels: [], thumbnail_url: '' })), ...(refined ? { refined } : {}) };
}

const tick = () => new Promise(resolve => setTimeout(resolve, 0));

test('pure parts: toggling, the request, net votes, what the panel says', () => {
  assert.equal(nextVote(undefined, 'up'), 'up');
  assert.equal(nextVote('up', 'up'), 'none');
  assert.equal(nextVote('down', 'up'), 'up');
  assert.deepEqual(voteRequest(QUERY, '7.1', 'down'),
    { query: '2.25.3', study_uid: '2.25.1', series_uid: '2.25.2', hit: '7.1', vote: 'down' });
  assert.deepEqual(netVotes([{ hit_sop_uid: 'a', vote: 'up' }, { hit_sop_uid: 'a', vote: 'down' },
    { hit_sop_uid: 'b', vote: 'down' }, { hit_sop_uid: 'c', vote: 'up' }]), { b: 'down', c: 'up' });
  assert.equal(refinedText({ up: 2, down: 1 }), 'refined with 2 👍 / 1 👎');
  assert.equal(refinedText(undefined), '');
});

test('votes are posted, shown pressed, withdrawn by a second click; refine asks feedback/refine and says so',
  async () => {
    const fetch = fakeFetch(url => {
      if (url.endsWith('/similar')) {
        return { status: 200, body: answer(['1.1', '1.2']) };
      }
      if (url.endsWith('/feedback/refine')) {
        return { status: 200, body: answer(['1.2', '1.1'], { up: 1, down: 0, skipped: 0 }) };
      }
      if (url.includes('/feedback?query=')) {
        return { status: 200, body: { votes: [] } };
      }
      if (url.endsWith('/feedback')) {
        return { status: 201, body: {} };
      }
      return { status: 200, body: { labels: [] } };
    });
    const ctl = createController({ fetch });
    const feedback = createFeedback({ controller: ctl, fetch });
    const view = createPanelView(ctl, null, feedback);
    const root = container();
    view.mount(root);
    await ctl.find(QUERY);
    await tick();
    assert.ok(fetch.calls.some(c => c.url === '/api/v1/feedback?query=2.25.3'));
    const refine = () => root.find('data-cy', 'medsim-refine');
    assert.equal(refine().disabled, true);
    root.findAll('data-cy', 'medsim-vote-up')[1].click();
    await tick();
    assert.deepEqual(fetch.calls.at(-1).body,
      { query: '2.25.3', study_uid: '2.25.1', series_uid: '2.25.2', hit: '1.2', vote: 'up' });
    assert.equal(root.findAll('data-cy', 'medsim-vote-up')[1].getAttribute('aria-pressed'), 'true');
    assert.equal(refine().textContent, 'Refine (1 👍 / 0 👎)');
    refine().click();
    await tick();
    await tick();
    assert.ok(fetch.calls.at(-1).url.endsWith('/api/v1/feedback/refine') || fetch.calls.some(
      c => c.url.endsWith('/feedback/refine')));
    assert.deepEqual(root.findAll('data-cy', 'medsim-result').map(r => r.getAttribute('data-sop-uid')), ['1.2', '1.1']);
    assert.equal(root.find('data-cy', 'medsim-refined').textContent, 'refined with 1 👍 / 0 👎');
    root.findAll('data-cy', 'medsim-vote-up')[0].click();  // 1.2 is first now: pressed again -> withdrawn
    await tick();
    assert.equal(fetch.calls.at(-1).body.vote, 'none');
    assert.equal(root.findAll('data-cy', 'medsim-vote-up')[0].getAttribute('aria-pressed'), 'false');
  });

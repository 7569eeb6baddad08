// The OHIF glue (plugin/ohif/src/extension.js, mode.js) against fake OHIF services: node --test tests/plugin/
import assert from 'node:assert/strict';
import { test } from 'node:test';

import extension, {
  BUTTON_UI_TYPE, EXTENSION_ID, FIND_BUTTON, FIND_COMMAND, PANEL_ID, activeInstance, hostElement, revealPanel,
} from '../../plugin/ohif/src/extension.js';
import mode, { EXTENSION_URL, MODE_ID, ROUTE, buildModeInstance } from '../../plugin/ohif/src/mode.js';

function fakeBasicMode() {
  const calls = [];
  const layoutInstance = { id: '@ohif/extension-default.layoutTemplateModule.viewerLayout',
    props: { leftPanels: ['left'], rightPanels: ['seg', 'measure'], rightPanelClosed: true, viewports: [] } };
  const instance = {
    id: '@ohif/mode-basic', routeName: 'basic', hide: true, displayName: 'Basic',
    extensions: { '@ohif/extension-default': '^3.0.0', '@ohif/extension-cornerstone': '^3.0.0' },
    routes: [{ path: 'basic', layoutInstance, layoutTemplate() { return structuredClone(this.layoutInstance); } }],
    onModeEnter(args) { calls.push(['enter', this.id, args]); },
    onModeExit(args) { calls.push(['exit', this.id, args]); },
    sopClassHandlers: ['stack'],
    isValidMode() { return { valid: true }; },
  };
  return { calls, module: { id: '@ohif/mode-basic', modeInstance: instance,
    modeFactory() { return this.modeInstance; } } };
}

function fakeToolbarService() {
  const state = { buttons: {}, sections: { primary: ['Zoom'] } };
  return {
    state,
    sections: { primary: 'primary' },
    register(buttons, replace) { buttons.forEach(b => { if (replace || !state.buttons[b.id]) state.buttons[b.id] = b; }); },
    updateSection(key, ids) { state.sections[key] = [...(state.sections[key] || []), ...ids.filter(i => !(state.sections[key] || []).includes(i))]; },
  };
}

test('the mode is the basic mode plus the panel (first on the right), the button and the extension by URL', async () => {
  const basic = fakeBasicMode();
  const instance = await mode.modeFactory({ modeConfiguration: {}, loadModules: async names => {
    assert.deepEqual(names, ['@ohif/mode-basic']);
    return [basic.module];
  } });
  assert.equal(instance.id, MODE_ID);
  assert.equal(instance.routeName, ROUTE);
  assert.equal(instance.hide, false);
  assert.deepEqual(instance.sopClassHandlers, ['stack'], 'everything else comes from the basic mode');
  assert.equal(instance.extensions[EXTENSION_URL], '^0.1.0');
  assert.equal(instance.extensions['@ohif/extension-default'], '^3.0.0');
  assert.ok(EXTENSION_URL.endsWith('/plugin/ohif/src/extension.js'));
  const route = instance.routes[0];
  assert.equal(route.path, ROUTE);
  const layout = route.layoutTemplate();
  assert.deepEqual(layout.props.rightPanels, [PANEL_ID, 'seg', 'measure']);
  assert.deepEqual(layout.props.leftPanels, ['left']);
  assert.equal(basic.module.modeInstance.routes[0].layoutInstance.props.rightPanels.length, 2, 'basic mode untouched');

  const toolbarService = fakeToolbarService();
  const args = { servicesManager: { services: { toolbarService } } };
  instance.onModeEnter(args);
  assert.equal(basic.calls[0][0], 'enter');
  assert.equal(basic.calls[0][1], MODE_ID, 'the basic onModeEnter runs on this mode instance');
  assert.deepEqual(toolbarService.state.sections.primary, ['Zoom', FIND_BUTTON.id]);
  const button = toolbarService.state.buttons[FIND_BUTTON.id];
  assert.equal(button.uiType, BUTTON_UI_TYPE);
  assert.equal(button.props.label, 'Find similar cases');
  assert.equal(button.props.commands, FIND_COMMAND);
  assert.notEqual(button, FIND_BUTTON, 'a copy: OHIF mutates the props it is given');
  instance.onModeEnter(args);
  assert.deepEqual(toolbarService.state.sections.primary, ['Zoom', FIND_BUTTON.id], 'no duplicate on re-entry');
  instance.onModeExit(args);
  assert.equal(basic.calls.at(-1)[0], 'exit');
});

test('buildModeInstance does not add the panel twice', () => {
  const basic = fakeBasicMode().module.modeInstance;
  basic.routes[0].layoutInstance.props.rightPanels = [PANEL_ID, 'seg'];
  const instance = buildModeInstance(basic, { extensionUrl: 'https://h/medsim-plugin/extension.js' });
  assert.deepEqual(instance.routes[0].layoutInstance.props.rightPanels, [PANEL_ID, 'seg']);
  assert.ok('https://h/medsim-plugin/extension.js' in instance.extensions);
});

test('the extension: id, panel module (a React host element with a stable ref), toolbar button type, command', () => {
  assert.equal(extension.id, EXTENSION_ID);
  assert.equal(PANEL_ID, `${EXTENSION_ID}.panelModule.similarCases`);
  const [panel] = extension.getPanelModule({ extensionManager: {}, appConfig: { medsim: {} } });
  assert.equal(panel.name, 'similarCases');
  assert.equal(panel.label, 'Similar cases');
  const first = panel.component({});
  const second = panel.component({});
  assert.equal(first.$$typeof, Symbol.for('react.element'));
  assert.equal(first.type, 'div');
  assert.equal(typeof first.ref, 'function');
  assert.equal(first.ref, second.ref, 'the same ref on every render: React does not remount the panel');

  const [buttonType] = extension.getToolbarModule({});
  assert.equal(buttonType.name, BUTTON_UI_TYPE);
  const interactions = [];
  const element = buttonType.defaultComponent({ id: 'b', label: 'Find similar cases', commands: 'c',
    onInteraction: args => interactions.push(args) });
  assert.equal(element.type, 'button');
  assert.equal(element.props.children, 'Find similar cases');
  assert.equal(element.props['aria-label'], 'Find similar cases');
  element.props.onClick();
  assert.deepEqual(interactions, [{ itemId: 'b', commands: 'c' }]);

  const commands = extension.getCommandsModule({ servicesManager: { services: {} }, extensionManager: {}, appConfig: {} });
  assert.equal(typeof commands.definitions[FIND_COMMAND].commandFn, 'function');
  assert.equal(hostElement('span', { a: 1 }).props.a, 1);
});

function fakeServices({ instances, index = 0, withViewport = true }) {
  const displaySet = { displaySetInstanceUID: 'ds1', Modality: 'CR', StudyInstanceUID: '1', SeriesInstanceUID: '1.1',
    instances };
  return {
    viewportGridService: {
      getActiveViewportId: () => 'default',
      getState: () => ({ viewports: new Map(withViewport ? [['default', { displaySetInstanceUIDs: ['ds1'] }]] : []) }),
    },
    displaySetService: { getDisplaySetByUID: uid => (uid === 'ds1' ? displaySet : undefined) },
    cornerstoneViewportService: { getCornerstoneViewport: () => ({ getCurrentImageIdIndex: () => index }) },
  };
}

test('activeInstance: the image shown in the active viewport', () => {
  const instances = [{ SOPInstanceUID: 'a' }, { SOPInstanceUID: 'b' }];
  assert.equal(activeInstance({ services: fakeServices({ instances, index: 1 }) }).instance.SOPInstanceUID, 'b');
  assert.equal(activeInstance({ services: fakeServices({ instances, index: 7 }) }).instance.SOPInstanceUID, 'a');
  assert.equal(activeInstance({ services: fakeServices({ instances, withViewport: false }) }).instance, null);
});

test('the command finds similar cases for the active image and opens the panel', async () => {
  const activated = [];
  const services = {
    ...fakeServices({ instances: [{ StudyInstanceUID: '1', SeriesInstanceUID: '1.1', SOPInstanceUID: '1.1.1',
      Modality: 'CT' }] }),
    panelService: { activatePanel: (id, force) => activated.push([id, force]) },
  };
  const originalFetch = globalThis.fetch;
  globalThis.fetch = async () => { throw new Error('must not be called for a CT'); };
  try {
    const commands = extension.getCommandsModule({ servicesManager: { services }, extensionManager: {},
      appConfig: { medsim: {} } });
    const state = await commands.definitions[FIND_COMMAND].commandFn();
    assert.deepEqual(activated, [[PANEL_ID, true]]);
    assert.equal(state.status, 'error');
    assert.equal(state.error.kind, 'not-chest');
  } finally {
    globalThis.fetch = originalFetch;
  }
});

test('onModeEnter wraps VOILUTFunction of added display sets (OHIF 3.13.2 work-around) and unsubscribes on exit', () => {
  let listener = null;
  let unsubscribed = 0;
  const existing = { instances: [{ VOILUTFunction: 'LINEAR' }] };
  const displaySetService = {
    EVENTS: { DISPLAY_SETS_ADDED: 'added' },
    getActiveDisplaySets: () => [existing],
    subscribe: (event, fn) => { assert.equal(event, 'added'); listener = fn; return { unsubscribe: () => { unsubscribed += 1; } }; },
  };
  extension.onModeEnter({ servicesManager: { services: { displaySetService } } });
  assert.deepEqual(existing.instances[0].VOILUTFunction, ['LINEAR']);
  const added = { instances: [{ VOILUTFunction: 'SIGMOID' }, {}] };
  listener({ displaySetsAdded: [added] });
  assert.deepEqual(added.instances[0].VOILUTFunction, ['SIGMOID']);
  extension.onModeExit({});
  assert.equal(unsubscribed, 1);
});

test('revealPanel activates the tab, and clicks the tab button only when the panel is not shown', async () => {
  const activated = [];
  const services = { services: { panelService: { activatePanel: (id, force) => activated.push([id, force]) } } };
  let clicks = 0;
  const doc = host => ({ querySelector: sel => (sel.includes('medsim-panel-host') ? host
    : (sel === '[data-cy="similarCases-btn"]' ? { click: () => { clicks += 1; } } : null)) });
  revealPanel(services, { doc: doc({ offsetParent: {} }), delayMs: 1 });
  await new Promise(resolve => setTimeout(resolve, 10));
  assert.equal(clicks, 0, 'shown: nothing to click');
  revealPanel(services, { doc: doc({ offsetParent: null }), delayMs: 1 });
  revealPanel(services, { doc: doc(null), delayMs: 1 });
  await new Promise(resolve => setTimeout(resolve, 10));
  assert.equal(clicks, 2, 'hidden or not mounted: the tab button is clicked');
  assert.deepEqual(activated[0], [PANEL_ID, true]);
  revealPanel(services, { doc: null });
  assert.equal(activated.length, 4);
});

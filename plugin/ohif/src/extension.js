/**
 * medsim OHIF extension: the "Similar cases" panel and the command behind the "Find similar cases" button.
 *
 * A plain ES module that the prebuilt OHIF viewer (3.13) loads at run time from app-config.js:
 *     extensions: ['https://your.host/medsim-plugin/extension.js']
 * The mode (mode.js) names this module by the same URL in its `extensions`, and adds the panel and the button.
 * Settings come from `window.config.medsim` (app-config.js): {apiRoot, modeRoute, showAnywayK, timeoutMs,
 * linkToken}.
 */

import { createController, fixVoiLutFunction, qidoStudyLookup, queryFromInstance } from './logic.js';
import { createPanelView } from './panel.js';
import { createCohortExport } from './cohort.js';
import { createCompare } from './compare.js';
import { createFeedback } from './feedback.js';

export const EXTENSION_ID = '@medsim/extension-similar-cases';
export const PANEL_NAME = 'similarCases';
export const PANEL_ID = `${EXTENSION_ID}.panelModule.${PANEL_NAME}`;
export const FIND_COMMAND = 'medsimFindSimilarCases';
export const BUTTON_ID = 'medsimFindSimilarCases';
export const BUTTON_UI_TYPE = 'medsim.labelledButton';
export const VERSION = '0.1.0';

const STYLESHEET_ID = 'medsim-panel-css';
// React 18 (the viewer's) element marker. The prebuilt viewer gives plugins no React, so the few host elements
// the panel and the button need are made as plain element objects; the browser test catches a React change.
const REACT_ELEMENT = Symbol.for('react.element');

/** A React host element (e.g. a <div>) without React: {type, props, ref}. */
export function hostElement(type, props = {}, ref = null, key = null) {
  return { $$typeof: REACT_ELEMENT, type, key, ref, props, _owner: null, _store: {} };
}

let controller = null;
let panelView = null;
let services = null;
let voiFixSubscription = null;

function ensureStylesheet() {
  if (typeof document === 'undefined' || document.getElementById(STYLESHEET_ID)) {
    return;
  }
  const link = document.createElement('link');
  link.id = STYLESHEET_ID;
  link.rel = 'stylesheet';
  link.href = new URL('./panel.css', import.meta.url).href;
  document.head.appendChild(link);
}

function authHeaders() {
  const auth = services?.userAuthenticationService;
  try {
    const header = auth?.getAuthorizationHeader?.();
    return header && header.Authorization ? { Authorization: header.Authorization } : {};
  } catch (error) {
    return {};
  }
}

function bearerToken() {
  const value = authHeaders().Authorization || '';
  return value.startsWith('Bearer ') ? value.slice(7) : undefined;
}

/** Study date and description from the active data source: QIDO-RS at its qidoRoot, else its own search. */
async function searchStudy(extensionManager, studyInstanceUid) {
  const dataSource = extensionManager?.getActiveDataSource?.()?.[0];
  const qidoRoot = dataSource?.getConfig?.()?.qidoRoot;
  if (qidoRoot) {
    return qidoStudyLookup({ fetch: (...args) => globalThis.fetch(...args), qidoRoot, headers: authHeaders })(
      studyInstanceUid);
  }
  if (!dataSource?.query?.studies?.search) {
    return null;
  }
  const found = await dataSource.query.studies.search({ studyInstanceUid });
  const study = (found || []).find(s => s.studyInstanceUid === studyInstanceUid) || (found || [])[0];
  return study ? { date: study.date || '', description: study.description || '' } : null;
}

function getController(extensionManager, appConfig) {
  if (!controller) {
    const settings = appConfig?.medsim || {};
    controller = createController({
      fetch: (...args) => globalThis.fetch(...args),
      config: {
        ...settings,
        origin: globalThis.location?.origin || '',
        routerBasename: appConfig?.routerBasename || '/',
        // tokens in URLs end up in the browser history: only when the deployment asks for it
        token: settings.linkToken ? bearerToken : undefined,
      },
      authHeaders,
      searchStudy: uid => searchStudy(extensionManager, uid),
    });
    const compare = createCompare({ controller, services: () => services, extensionManager, hostElement,
      fetch: (...args) => globalThis.fetch(...args), headers: authHeaders });
    const feedback = createFeedback({ controller, fetch: (...args) => globalThis.fetch(...args), headers: authHeaders });
    const cohort = createCohortExport({ controller, fetch: (...args) => globalThis.fetch(...args),
      headers: authHeaders });
    panelView = createPanelView(controller, compare, feedback, cohort);
  }
  return controller;
}

/** The image in the active viewport: its naturalized metadata (UIDs, Modality, ...), or null. */
export function activeInstance(servicesManager) {
  const { viewportGridService, displaySetService, cornerstoneViewportService } = servicesManager.services;
  const state = viewportGridService?.getState?.();
  const viewportId = viewportGridService?.getActiveViewportId?.() ?? state?.activeViewportId;
  const viewports = state?.viewports;
  const viewport = viewports instanceof Map ? viewports.get(viewportId) : viewports?.[viewportId];
  const displaySetUid = viewport?.displaySetInstanceUIDs?.[0];
  const displaySet = displaySetUid ? displaySetService?.getDisplaySetByUID?.(displaySetUid) : null;
  if (!displaySet) {
    return { instance: null, displaySet: null };
  }
  let index = 0;
  try {
    index = cornerstoneViewportService?.getCornerstoneViewport?.(viewportId)?.getCurrentImageIdIndex?.() ?? 0;
  } catch (error) {
    index = 0;
  }
  const instances = displaySet.instances || [];
  const instance = instances[index] || instances[0] || displaySet.instance || null;
  return { instance, displaySet };
}

/**
 * Show the panel: activate its tab; and when the user had closed the right side panel by hand (OHIF then ignores
 * activation requests), click the panel's tab button in the collapsed side bar, as the user would.
 */
export function revealPanel(servicesManager, { doc = globalThis.document, delayMs = 250 } = {}) {
  servicesManager.services.panelService?.activatePanel?.(PANEL_ID, true);
  if (!doc?.querySelector) {
    return;
  }
  setTimeout(() => {
    const host = doc.querySelector('[data-cy="medsim-panel-host"]');
    if (!host || host.offsetParent === null) {
      doc.querySelector(`[data-cy="${PANEL_NAME}-btn"]`)?.click?.();
    }
  }, delayMs);
}

const extension = {
  id: EXTENSION_ID,
  version: VERSION,

  preRegistration({ servicesManager, extensionManager, appConfig }) {
    services = servicesManager.services;
    ensureStylesheet();
    getController(extensionManager, appConfig);
  },

  // Every mode (the extension is registered app-wide): see logic.fixVoiLutFunction (OHIF 3.13.2 image loader).
  onModeEnter({ servicesManager }) {
    const { displaySetService } = servicesManager.services;
    if (!displaySetService?.subscribe) {
      return;
    }
    const fix = displaySets => (displaySets || []).forEach(ds => fixVoiLutFunction(ds?.instances));
    fix(displaySetService.getActiveDisplaySets?.());
    voiFixSubscription?.unsubscribe?.();
    voiFixSubscription = displaySetService.subscribe(displaySetService.EVENTS.DISPLAY_SETS_ADDED,
      ({ displaySetsAdded } = {}) => fix(displaySetsAdded));
  },

  onModeExit() {
    voiFixSubscription?.unsubscribe?.();
    voiFixSubscription = null;
  },

  getPanelModule({ extensionManager, appConfig }) {
    getController(extensionManager, appConfig);
    // One stable ref: React calls it with the host <div> on mount and with null on unmount; the controller keeps
    // the state in between (switching tabs does not lose the results).
    const ref = node => (node ? panelView.mount(node) : panelView.unmount());
    const SimilarCasesPanel = () => hostElement('div', { className: 'medsim-panel-host',
      'data-cy': 'medsim-panel-host' }, ref);
    return [{
      name: PANEL_NAME,
      iconName: 'icon-search',
      iconLabel: 'Similar',
      label: 'Similar cases',
      component: SimilarCasesPanel,
    }];
  },

  getToolbarModule() {
    // A toolbar button with a visible label ("Find similar cases"); the stock tool buttons show an icon only.
    const LabelledButton = props => {
      const { id, label, tooltip, commands, onInteraction, disabled } = props;
      return hostElement('button', {
        type: 'button',
        className: 'medsim-toolbar-button',
        'data-cy': id,
        'aria-label': label,
        title: tooltip || label,
        disabled: !!disabled,
        onClick: () => onInteraction?.({ itemId: id, commands }),
        children: label,
      });
    };
    return [{ name: BUTTON_UI_TYPE, defaultComponent: LabelledButton }];
  },

  getCommandsModule({ servicesManager, extensionManager, appConfig }) {
    return {
      definitions: {
        [FIND_COMMAND]: {
          commandFn: () => {
            const ctl = getController(extensionManager, appConfig);
            const { instance, displaySet } = activeInstance(servicesManager);
            const query = queryFromInstance(instance, displaySet || {});
            revealPanel(servicesManager);
            return ctl.find(query);
          },
        },
      },
      defaultContext: 'VIEWER',
    };
  },
};

/** The toolbar button the mode registers (toolbarService.register + updateSection('primary', ...)). */
export const FIND_BUTTON = Object.freeze({
  id: BUTTON_ID,
  uiType: BUTTON_UI_TYPE,
  props: {
    icon: 'icon-search',
    label: 'Find similar cases',
    tooltip: 'Find similar cases of other patients for the image in the active viewport',
    commands: FIND_COMMAND,
    evaluate: 'evaluate.action',
  },
});

export default extension;

/**
 * medsim OHIF mode "Similar cases (chest X-ray)": OHIF's basic viewer plus the "Find similar cases" button and the
 * "Similar cases" panel (route /similar?StudyInstanceUIDs=...).
 *
 * A plain ES module that the prebuilt OHIF viewer (3.13) loads at run time from app-config.js:
 *     modes: ['https://your.host/medsim-plugin/mode.js']
 * It is built at start-up (modeFactory) from the viewer's own basic mode (`@ohif/mode-basic`, bundled in the
 * prebuilt viewer), so it follows that version's tools, layout and SOP class handlers. It depends on the medsim
 * extension by that module's URL (OHIF imports a mode's extensions by the keys of `extensions`).
 */

import { EXTENSION_ID, FIND_BUTTON, PANEL_ID, VERSION } from './extension.js';

export const MODE_ID = '@medsim/mode-similar-cases';
export const ROUTE = 'similar';
export const EXTENSION_URL = new URL('./extension.js', import.meta.url).href;

/** The mode instance, from the basic mode instance `base` (pure: exported for the tests). */
export function buildModeInstance(base, { route = ROUTE, extensionUrl = EXTENSION_URL } = {}) {
  const baseRoute = base.routes[0];
  const baseLayout = baseRoute.layoutInstance;
  const rightPanels = [PANEL_ID, ...(baseLayout.props.rightPanels || []).filter(p => p !== PANEL_ID)];
  const layoutInstance = {
    ...baseLayout,
    props: { ...baseLayout.props, rightPanels, rightPanelClosed: true },
  };
  return {
    ...base,
    id: MODE_ID,
    routeName: route,
    displayName: 'Similar cases (chest X-ray)',
    hide: false,
    routes: [{ ...baseRoute, path: route, layoutInstance }],
    extensions: { ...base.extensions, [extensionUrl]: `^${VERSION}` },
    onModeEnter(args) {
      base.onModeEnter.call(this, args);
      const { toolbarService } = args.servicesManager.services;
      toolbarService.register([structuredClone(FIND_BUTTON)], true);
      toolbarService.updateSection(toolbarService.sections?.primary || 'primary', [FIND_BUTTON.id]);
    },
    onModeExit(args) {
      base.onModeExit.call(this, args);
    },
  };
}

const mode = {
  id: MODE_ID,
  extensionId: EXTENSION_ID,
  async modeFactory({ modeConfiguration, loadModules }) {
    const [basic] = await loadModules(['@ohif/mode-basic']);
    const base = typeof basic.modeFactory === 'function'
      ? await basic.modeFactory.call(basic, { modeConfiguration: modeConfiguration || {}, loadModules })
      : basic.modeInstance;
    return buildModeInstance(base);
  },
};

export default mode;

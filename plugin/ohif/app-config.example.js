/**
 * Example OHIF 3.13 app-config.js for an existing deployment with the medsim plugin (see docs/viewer.md).
 * The viewer, the plugin files and medsim's API are assumed on one origin, e.g. behind nginx:
 *   /                 the OHIF viewer (prebuilt dist)
 *   /medsim-plugin/   plugin/ohif/src/*  (extension.js, mode.js, logic.js, panel.js, panel.css)
 *   /api/v1/          proxied to `medsim serve --index DIR --pacs URL`
 *   /dicom-web/       your PACS's DICOMweb (or medsim's own proxy: `medsim serve --viewer DIR`)
 * `medsim serve --viewer DIR` generates the equivalent of this file itself (/app-config.js).
 */
window.config = {
  routerBasename: '/',
  // The medsim plugin: plain ES modules loaded by URL. The mode refers to the extension by the same URL.
  extensions: [window.location.origin + '/medsim-plugin/extension.js'],
  modes: [window.location.origin + '/medsim-plugin/mode.js'],
  showStudyList: true,
  defaultDataSourceName: 'pacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs',
      configuration: {
        friendlyName: 'PACS',
        name: 'pacs',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
  // Settings of the medsim plugin.
  medsim: {
    apiRoot: '/api/v1', // medsim's API; another origin needs `medsim serve --cors-origin <this origin>`
    modeRoute: 'similar', // the plugin's mode route: links to results open there
    showAnywayK: 10, // how many cases "Show top 10 anyway" asks for
    timeoutMs: 60000, // how long the panel waits for medsim
    linkToken: false, // true: links to results carry the viewer's ?token= on (it then shows in the history)
  },
};

// Opens series of one study in the OHIF Viewer (headless Chromium, playwright-core) and
// writes what OHIF made of them, for tests/test_viewer_ohif.py to check.
//
//   node ohif_check.js SPEC.json RESULT.json
//
// SPEC: {viewer, study, artifacts, items: [{name, series, kind: "seg" | "sr" | "pdf"}]}
// RESULT: {items: [{name, errors, segments, slices, screenshot, ...}]}, where for a SEG
// "segments" is [{index, label, color}] (OHIF's segmentation state and the colour it paints
// with) and "slices" maps each CT SOP Instance UID to the base64 of the label image OHIF
// built on it (one byte per pixel, row-major); for an SR "measurements" is what OHIF read
// from it ([{TrackingIdentifier, labels, coords, loaded}]) and "rehydratable" whether OHIF would load
// them into its measurement panel; for an Encapsulated PDF "pdf" is what its
// PDF viewport was given ({type, bytes, magic}). Every item gets a fresh page: one
// segmentation at a time, and the errors of one item are not blamed on the next.
'use strict';
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update'];
const TIMEOUT_MS = 60000;

async function openStudy(browser, spec, errors) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on('console', (message) => {
    if (message.type() === 'error') errors.push(`console.error: ${message.text()}`);
  });
  page.on('pageerror', (error) => errors.push(`page error: ${error.message}`));
  // OHIF catches some of its own exceptions and only shows them in a notification that
  // goes away after a few seconds ("Something went wrong"): record every one.
  await page.addInitScript(() => {
    window.__ohifErrorNotes = [];
    new MutationObserver(() => {
      const text = document.body ? document.body.innerText : '';
      const at = text.indexOf('Something went wrong');
      if (at >= 0) {
        const note = text.slice(at, at + 1500);
        if (!window.__ohifErrorNotes.includes(note)) window.__ohifErrorNotes.push(note);
      }
    }).observe(document, { childList: true, subtree: true, characterData: true });
  });
  await page.goto(`${spec.viewer}/viewer?StudyInstanceUIDs=${spec.study}`, { waitUntil: 'load' });
  const expected = spec.items.length + 1; // the CT and every result series
  await page.waitForFunction((n) => window.services
    && window.services.displaySetService.getActiveDisplaySets().length >= n, expected, { timeout: TIMEOUT_MS });
  await dismiss(page, 'Skip all'); // the first-visit tour
  await dismiss(page, 'Confirm and hide'); // the investigational-use banner
  return page;
}

async function dismiss(page, text) {
  const button = page.getByText(text, { exact: true }).first();
  try {
    await button.waitFor({ state: 'visible', timeout: 5000 });
    await button.click();
  } catch (error) {
    // not shown this time: nothing to dismiss
  }
}

// What a double click on the series' thumbnail does: put it in the active viewport.
async function showSeries(page, series) {
  return page.evaluate((seriesUID) => {
    const { displaySetService, viewportGridService } = window.services;
    const displaySet = displaySetService.getActiveDisplaySets().find((d) => d.SeriesInstanceUID === seriesUID);
    if (!displaySet) throw new Error(`OHIF has no display set for series ${seriesUID}`);
    const viewportId = viewportGridService.getActiveViewportId();
    window.commandsManager.runCommand('setDisplaySetsForViewports', {
      viewportsToUpdate: [{ viewportId, displaySetInstanceUIDs: [displaySet.displaySetInstanceUID] }],
    });
    return viewportId;
  }, series);
}

async function readSegmentation(page, viewportId) {
  await page.waitForFunction(() => {
    const [segmentation] = window.services.segmentationService.getSegmentations();
    const labelmap = segmentation && segmentation.representationData.Labelmap;
    return labelmap && labelmap.imageIds && labelmap.imageIds.every((id) => window.cornerstone.cache.getImage(id));
  }, null, { timeout: TIMEOUT_MS });
  return page.evaluate((viewport) => {
    const service = window.services.segmentationService;
    const segmentations = service.getSegmentations();
    const [segmentation] = segmentations;
    const segments = Object.values(segmentation.segments).map((segment) => ({
      index: segment.segmentIndex,
      label: segment.label,
      color: Array.from(service.getSegmentColor(viewport, segmentation.segmentationId, segment.segmentIndex)),
    }));
    const slices = {};
    for (const imageId of segmentation.representationData.Labelmap.imageIds) {
      const image = window.cornerstone.cache.getImage(imageId);
      const match = /instances\/([0-9.]+)\//.exec(image.referencedImageId);
      if (!match) throw new Error(`label image ${imageId} refers to ${image.referencedImageId}: no SOP Instance UID`);
      const pixels = Uint8Array.from(image.getPixelData());
      let text = '';
      for (let i = 0; i < pixels.length; i += 0x8000) {
        text += String.fromCharCode.apply(null, pixels.subarray(i, i + 0x8000));
      }
      slices[match[1]] = { rows: image.rows, columns: image.columns, pixels: btoa(text) };
    }
    return { count: segmentations.length, segments, slices };
  }, viewportId);
}

// The document OHIF's PDF viewport shows: the <object> it renders, and the bytes behind its URL.
async function readPdfViewport(page) {
  const handle = await page.waitForSelector('object[type="application/pdf"][data]', { timeout: TIMEOUT_MS });
  const url = await handle.getAttribute('data');
  await page.waitForTimeout(2000); // let Chromium's PDF viewer paint, for the screenshot
  return page.evaluate(async (source) => {
    const bytes = new Uint8Array(await (await fetch(source)).arrayBuffer());
    return { type: 'application/pdf', bytes: bytes.length, magic: String.fromCharCode(...bytes.subarray(0, 5)) };
  }, url);
}

// Scroll to the middle slice, so the screenshot shows the regions, not the vertex.
async function toMiddleSlice(page, viewportId) {
  await page.evaluate((id) => {
    const viewport = window.services.cornerstoneViewportService.getCornerstoneViewport(id);
    viewport.setImageIdIndex(Math.floor(viewport.getImageIds().length / 2));
  }, viewportId);
  await page.waitForTimeout(1500);
}

async function checkItem(browser, spec, item) {
  const errors = [];
  const page = await openStudy(browser, spec, errors);
  const result = { name: item.name, errors };
  try {
    const viewportId = await showSeries(page, item.series);
    if (item.kind === 'seg') {
      Object.assign(result, await readSegmentation(page, viewportId));
      await toMiddleSlice(page, viewportId);
    } else if (item.kind === 'pdf') {
      result.pdf = await readPdfViewport(page);
    } else {
      await page.waitForFunction((uid) => window.services.displaySetService.getActiveDisplaySets()
        .find((d) => d.SeriesInstanceUID === uid).isLoaded === true, item.series, { timeout: TIMEOUT_MS });
      try { // OHIF's error notification, opened to show its message and stack
        await page.getByText('Show Details', { exact: true }).first().click({ timeout: 4000 });
        await page.waitForTimeout(300);
      } catch (error) {
        // no error notification
      }
      result.rehydratable = await page.evaluate((uid) => window.services.displaySetService.getActiveDisplaySets()
        .find((d) => d.SeriesInstanceUID === uid).isRehydratable === true, item.series);
      result.measurements = await page.evaluate((uid) => window.services.displaySetService.getActiveDisplaySets()
        .find((d) => d.SeriesInstanceUID === uid).measurements.map((m) => ({
          TrackingIdentifier: m.TrackingIdentifier, labels: m.labels,
          coords: (m.coords || []).length, loaded: m.loaded === true })), item.series);
      await page.waitForTimeout(1500); // the outline drawn on its CT image, for the screenshot
    }
  } catch (error) {
    errors.push(`driver: ${error.message}`);
  }
  result.screenshot = path.join(spec.artifacts, `${item.name}.png`);
  await page.screenshot({ path: result.screenshot });
  for (const note of await page.evaluate(() => window.__ohifErrorNotes)) errors.push(`OHIF notification: ${note}`);
  await page.close();
  return result;
}

async function main() {
  const [specPath, resultPath] = process.argv.slice(2);
  const spec = JSON.parse(fs.readFileSync(specPath, 'utf8'));
  fs.mkdirSync(spec.artifacts, { recursive: true });
  const browser = await chromium.launch({ executablePath: spec.chromium || '/usr/bin/chromium', args: FLAGS });
  try {
    const items = [];
    for (const item of spec.items) items.push(await checkItem(browser, spec, item));
    fs.writeFileSync(resultPath, JSON.stringify({ items }));
  } finally {
    await browser.close();
  }
}

main().catch((error) => { console.error(error); process.exit(1); });

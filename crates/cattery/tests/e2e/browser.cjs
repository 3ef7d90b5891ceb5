// What every browser script of these e2e tests shares: the required environment and Debian's
// chromium, headless, as playwright-core launches it (CATTERY_CHROMIUM, default
// /usr/bin/chromium).
'use strict';

const { chromium } = require('playwright-core');

// The value of environment variable `k`; throws when it is not set.
function env(k) {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
}

// Headless chromium with the flags this machine needs, plus `extra`.
function launch(extra = []) {
  return chromium.launch({
    executablePath: process.env.CATTERY_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', ...extra],
  });
}

module.exports = { env, launch };

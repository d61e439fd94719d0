// Drives the official Node SDK (`klaviyo-api`) against a base URL.
//
// Run by tests/sdk.rs with NODE_PATH pointing at the node_modules that
// tests/sdk/install.sh makes. Prints one JSON object on its last line of stdout;
// exits non-zero when a call fails.
//
//   node_client.js calls URL KEY         get accounts, create an event, get profiles,
//                                        create or update a profile
//   node_client.js burst URL KEY N       N concurrent getProfiles calls with the
//                                        predictive_analytics condition (10/s burst);
//                                        counts every 429 the SDK's HTTP layer saw
//   node_client.js throttled URL KEY N   N concurrent getAccounts calls (1/s): first with
//                                        retries off (the 429s' shape as the SDK throws
//                                        them), then with the SDK's retry on
//   node_client.js failing URL KEY       one getAccounts call with the SDK's default retry
//                                        (3 attempts): what it threw, what it saw
'use strict';

const axios = require('axios');
const {
  ApiKeySession,
  AccountsApi,
  EventsApi,
  ProfilesApi,
  RetryWithExponentialBackoff,
} = require('klaviyo-api');

// Every response the SDK's axios receives, retried ones included.
const seen = [];
const record = (resp) => {
  seen.push({
    status: resp.status,
    retry_after: resp.headers['retry-after'] ?? null,
    proxy_error: resp.headers['x-klaviyo-proxy-error'] ?? null,
  });
};
axios.interceptors.response.use(
  (resp) => {
    record(resp);
    return resp;
  },
  (error) => {
    if (error.response) record(error.response);
    return Promise.reject(error);
  },
);

// One API object per group, each with the proxy as its base path.
function apis(url, key, numRetries) {
  const session = new ApiKeySession(key, new RetryWithExponentialBackoff({ numRetries, maxInterval: 10 }));
  const out = {
    accounts: new AccountsApi(session),
    events: new EventsApi(session),
    profiles: new ProfilesApi(session),
  };
  for (const api of Object.values(out)) api.basePath = url;
  return out;
}

async function calls(url, key) {
  const k = apis(url, key, 3);
  const accounts = await k.accounts.getAccounts();
  const event = await k.events.createEvent({
    data: {
      type: 'event',
      attributes: {
        properties: { source: 'klaviyo-proxy sdk test' },
        metric: { data: { type: 'metric', attributes: { name: 'Proxy SDK Test' } } },
        profile: { data: { type: 'profile', attributes: { email: 'sdk@example.com' } } },
        uniqueId: `${Date.now()}-${Math.random()}`,
      },
    },
  });
  const profiles = await k.profiles.getProfiles();
  const upsert = await k.profiles.createOrUpdateProfile({
    data: { type: 'profile', attributes: { email: 'sdk@example.com', firstName: 'Sdk' } },
  });
  return {
    account_id: accounts.body.data[0].id,
    event_status: event.response.status,
    profiles: profiles.body.data.length,
    first_profile_email: profiles.body.data[0].attributes.email,
    profile_id: upsert.body.data.id,
    profile_email: upsert.body.data.attributes.email,
  };
}

async function status(call) {
  try {
    await call();
    return 200;
  } catch (e) {
    if (e.response) return e.response.status;
    throw e;
  }
}

async function burst(url, key, n) {
  const k = apis(url, key, 3);
  const statuses = await Promise.all(
    Array.from({ length: n }, () =>
      status(() => k.profiles.getProfiles({ additionalFieldsProfile: ['predictive_analytics'] })),
    ),
  );
  const wire = seen.map((s) => s.status);
  return {
    ok: statuses.filter((s) => s === 200).length,
    statuses,
    wire_429s: wire.filter((s) => s === 429).length,
    wire: wire.length,
  };
}

async function tryAccounts(k) {
  try {
    await k.accounts.getAccounts();
    return null;
  } catch (e) {
    if (!e.response) throw e;
    const body = e.response.data;
    const retryAfter = e.response.headers['retry-after'];
    return {
      status: e.response.status,
      retry_after: retryAfter === undefined ? null : parseInt(retryAfter, 10),
      proxy_error: e.response.headers['x-klaviyo-proxy-error'] ?? null,
      error_status: body.errors[0].status,
      error_code: body.errors[0].code,
    };
  }
}

async function throttled(url, key, n) {
  // numRetries 1: the first failure is thrown as is.
  const first = apis(url, key, 1);
  const errors = await Promise.all(Array.from({ length: n }, () => tryAccounts(first)));
  const raised = errors.filter((e) => e !== null);
  seen.length = 0;
  const k = apis(url, key, 5);
  const statuses = await Promise.all(Array.from({ length: n }, () => status(() => k.accounts.getAccounts())));
  return { raised, statuses, seen };
}

async function failing(url, key) {
  const raised = await tryAccounts(apis(url, key, 3));
  return { raised, seen };
}

async function main() {
  const [mode, url, key, n] = process.argv.slice(2);
  let out;
  if (mode === 'calls') out = await calls(url, key);
  else if (mode === 'burst') out = await burst(url, key, Number(n));
  else if (mode === 'throttled') out = await throttled(url, key, Number(n));
  else if (mode === 'failing') out = await failing(url, key);
  else throw new Error(`unknown mode ${mode}`);
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e && e.response ? `HTTP ${e.response.status}: ${JSON.stringify(e.response.data)}` : e);
  process.exit(1);
});

#!/usr/bin/env bash
# Installs the official Klaviyo SDKs that tests/sdk.rs drives, into target/sdk/ (never
# committed, cached between runs): Python `klaviyo-api` in a virtualenv, Node
# `klaviyo-api` in a local node_modules. Needs python3 (with venv) and node + npm.
# Versions are pinned so a new SDK release cannot change a test run silently.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY_VERSION=25.0.0
NODE_VERSION=23.0.0
dir=target/sdk
mkdir -p "$dir"

if ! "$dir/venv/bin/python" -c "import klaviyo_api, importlib.metadata as m; assert m.version('klaviyo-api') == '$PY_VERSION'" 2>/dev/null; then
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check "klaviyo-api==$PY_VERSION"
fi

if [ "$(node -p "require('./$dir/node/node_modules/klaviyo-api/package.json').version" 2>/dev/null)" != "$NODE_VERSION" ]; then
  mkdir -p "$dir/node"
  echo '{"name":"klaviyo-proxy-sdk-tests","private":true}' > "$dir/node/package.json"
  npm install --silent --no-audit --no-fund --prefix "$dir/node" "klaviyo-api@$NODE_VERSION"
fi

#!/usr/bin/env bash
# Make sure a Chromium binary is there for the report's browser test (tests/test_report_browser.py, which drives it
# through Playwright's pinned wheel: Playwright's own browser download is never used). Where none is found and
# apt-get can run as root (or through sudo without a password), install Debian's `chromium` package (about a minute:
# ~130 packages, measured 63 s here). Never fails: where nothing can be installed it says so and the test skips.
for b in chromium chromium-browser google-chrome google-chrome-stable; do
  command -v "$b" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ]; then as_root=""; elif sudo -n true 2>/dev/null; then as_root="sudo -n"; else as_root=none; fi
if [ "$as_root" = none ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium.sh: no Chromium, and no apt-get as root to install it: the report's browser test will skip" \
       "(apt-get install -y chromium)" >&2
  exit 0
fi
echo "install_chromium.sh: installing Debian's chromium for the report's browser test" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $as_root apt-get install -y -q chromium >/dev/null 2>&1; then  # a fresh system has no package lists yet
  $as_root apt-get update -q >/dev/null 2>&1
  $as_root apt-get install -y -q chromium >/dev/null 2>&1 \
    || echo "install_chromium.sh: apt-get install chromium failed: the report's browser test will skip" >&2
fi
exit 0

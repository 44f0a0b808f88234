#!/usr/bin/env bash
# Installs Debian's chromium where apt exists, for the test that opens the study report in a real
# (headless) browser. Optional by design: without it that test skips with one line, so every failure
# here is reported and swallowed.
if [ -x /usr/bin/chromium ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing chromium from Debian (for the report's browser test) ..."
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || { echo "chromium not installed (apt failed); the report's browser test will skip"; exit 0; }
  echo "chromium ready: $(/usr/bin/chromium --version 2>/dev/null)"
else
  echo "chromium not installed (no apt or not root); the report's browser test will skip"
fi
exit 0

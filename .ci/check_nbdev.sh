#!/usr/bin/env bash
# Fails when nbdev_clean or nbdev_export would change a file: notebooks must be clean and
# mammo_nb/ must be exactly what the notebooks export. Works with uncommitted changes too.
set -euo pipefail
snap() { find nbs mammo_nb -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha256sum; }
before=$(snap)
nbdev_clean >/dev/null
after_clean=$(snap)
nbdev_export >/dev/null
after=$(snap)
status=0
if [ "$before" != "$after_clean" ]; then
  echo "nbdev_clean changed notebooks (commit the cleaned versions):"; diff <(echo "$before") <(echo "$after_clean") | grep '^>' | awk '{print "  " $3}'; status=1
fi
if [ "$after_clean" != "$after" ]; then
  echo "nbdev_export changed mammo_nb/ (module out of sync with notebooks):"; diff <(echo "$after_clean") <(echo "$after") | grep '^>' | awk '{print "  " $3}'; status=1
fi
[ $status = 0 ] && echo "notebooks clean, module in sync"
exit $status

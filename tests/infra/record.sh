# Sourced by the tests/infra/*_up.sh scripts: note what they start, so that the test session that
# asked for it can stop exactly that (tests/infra/down.sh) and nothing that was already there.
# FPO_DS_INFRA_STATE (set by tests/helpers.py) names the list; run by hand, nothing is recorded.
record() {
  if [ -n "${FPO_DS_INFRA_STATE:-}" ]; then
    mkdir -p "$(dirname "$FPO_DS_INFRA_STATE")"
    echo "$*" >> "$FPO_DS_INFRA_STATE"
  fi
}

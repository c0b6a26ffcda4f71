#!/usr/bin/env bash
# The 8B recipes read the same data as the 3B ones (data/full): see recipes/3b/prepare_data.sh.
exec bash "$(dirname "$0")/../3b/prepare_data.sh" "$@"

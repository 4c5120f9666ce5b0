# One command per chore. The README's two commands are `make run` and `make test`.
.PHONY: setup native run test test-unit protos protos-check lint bench clean

setup:
	bash scripts/setup.sh
	bash scripts/build-native.sh --if-available

# The ingest service's native (Rust) fast path; needs cargo (https://rustup.rs). Without it the
# pure-Python path runs (setup only warns).
native:
	bash scripts/build-native.sh

run: setup
	.venv/bin/vigil up --demo

test: setup
	bash scripts/test-deps.sh
	.venv/bin/python -m pytest -q -ra

test-unit: setup
	.venv/bin/python -m pytest -q -m "not integration and not e2e"

protos: setup
	.venv/bin/python scripts/gen-protos.py

protos-check: setup
	.venv/bin/python scripts/gen-protos.py --check

lint: setup
	.venv/bin/ruff check vigil services tests scripts

bench: setup
	.venv/bin/vigil bench --quick

clean:
	rm -rf vigil-data .pytest_cache

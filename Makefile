.PHONY: setup serve chat test bench bench-serve

setup:
	./scripts/setup

serve: setup
	.venv/bin/hanlin serve

chat: setup
	.venv/bin/hanlin chat

test:
	./scripts/setup --test
	.venv/bin/python -m pytest -q

bench:
	./scripts/setup --test
	.venv/bin/python bench/speed.py

bench-serve:
	./scripts/setup --test
	.venv/bin/python bench/serve.py

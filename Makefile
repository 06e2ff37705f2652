.PHONY: setup chat test bench

setup:
	./scripts/setup

chat: setup
	.venv/bin/hanlin chat

test:
	./scripts/setup --test
	.venv/bin/python -m pytest -q

bench:
	./scripts/setup --test
	.venv/bin/python bench/decode.py

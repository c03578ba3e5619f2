# The two commands in the README: `make serve` and `make test`.
.PHONY: serve test bench bootstrap

bootstrap:
	@bash scripts/bootstrap.sh

serve: bootstrap
	.venv/bin/poisonaudit serve

test: bootstrap
	@bash scripts/services.sh
	.venv/bin/python -m pytest -q

bench: bootstrap
	.venv/bin/python -m bench

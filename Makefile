# The two commands in the README: `make serve` and `make test`.
.PHONY: serve test bench bootstrap

bootstrap:
	@bash scripts/bootstrap.sh test

serve:
	@bash scripts/bootstrap.sh serve
	.venv/bin/poisonaudit serve

test:
	@bash scripts/bootstrap.sh test
	@bash scripts/services.sh
	.venv/bin/python -m pytest -q

bench: bootstrap
	.venv/bin/python -m bench

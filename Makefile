# The two commands of the README, and a few more for development.
.PHONY: run test test-quick bench clean

run:            ## run the server on the embedded defaults (127.0.0.1:8080, ./data, no Redis)
	@scripts/bootstrap.sh run
	.venv/bin/agentchat serve

test:           ## the whole test suite, installing what it needs first
	scripts/test.sh

test-quick:     ## everything but the slow end-to-end tests
	scripts/test.sh -m "not slow"

bench:          ## saturated fan-out, AgentChat beside the Node ws, socket.io and python-socketio relays
	@scripts/bootstrap.sh test
	.venv/bin/python -m bench run fanout

clean:
	rm -rf .venv data .pytest_cache artifacts

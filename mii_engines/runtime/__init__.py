"""The replica runtime every engine shares: loop, scheduling, KV state, runner, sampling, output."""

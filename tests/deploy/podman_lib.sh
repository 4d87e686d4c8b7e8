# Sourced by image_check.sh and cuda_standin_check.sh (docs/deployment.md): the podman command
# line they share, free loopback ports, and the lifecycle of the container under test.
# shellcheck shell=bash
P=(podman --runtime runc --cgroup-manager=cgroupfs)
# shellcheck disable=SC2034  # used by the scripts that source this file
U=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

# podman_cleanup CONTAINER DIR IMAGE...: removes the container, the images and the folder.
podman_cleanup() {
  local container=$1 dir=$2
  shift 2
  "${P[@]}" rm -f -t 0 "$container" >/dev/null 2>&1 || true
  "${P[@]}" rmi -f "$@" >/dev/null 2>&1 || true
  rm -rf "$dir"
}

# Prints two free TCP ports on 127.0.0.1 (the server's and the metrics').
free_ports() {
  python3 -c 'import socket
s = [socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(*(x.getsockname()[1] for x in s))'
}

# wait_listening CONTAINER: up to 60 s for lossd's "lossd listening" line, or the container's end.
wait_listening() {
  for _ in $(seq 120); do
    [[ "$("${P[@]}" logs "$1" 2>&1)" == *"lossd listening"* ]] && break
    [ "$("${P[@]}" inspect --format '{{.State.Running}}' "$1")" = true ] || break
    sleep 0.5
  done
}

# stop_exit_code CONTAINER: SIGTERM (podman stop, 30 s), then prints the container's exit code.
stop_exit_code() {
  "${P[@]}" stop -t 30 "$1" 2>&1 | grep -v "systemd connection" >/dev/null || true
  "${P[@]}" inspect --format '{{.State.ExitCode}}' "$1"
}

"""A multi-host rehearsal on one machine: two network namespaces are two hosts.

Host A and host B each get a network namespace and a UTS namespace (their own host names),
joined by a veth pair with addresses in 127.100.0.0/24 — loopback-range addresses, which never
leave the machine; inside each namespace the loopback route is narrowed to 127.0.0.1 so that
127.100.0.x goes over the veth, and ``route_localnet`` lets such addresses cross it. mpirun runs
on host A; Open MPI starts its daemon on host B through ``plm_ssh_agent``, here a script that
does what ssh would (run the command "on" that host: ``ip netns exec`` into B's namespaces).
Ranks on different hosts then talk over Open MPI's TCP transport across the veth, exactly the
multi-host set-up of the README (hostfile, ``-x`` for the environment, a shared file system:
here both hosts see the same disk).

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2 and util-linux; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers import (
    PIPETRAIN,
    REPO,
    assert_bitwise_equal,
    assert_same_steps,
    load_params,
    run_state,
)
from tests.mpi.mpirun import MPIRUN, assert_no_survivors, mpi_env

SUBNET = "127.100.0"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def two_hosts(tmp_path):
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("needs root, iproute2 (ip) and util-linux (unshare)")
    tag = uuid.uuid4().hex[:6]
    hosts = {"hosta": (f"pta-{tag}", f"va{tag}", f"{SUBNET}.1"),
             "hostb": (f"ptb-{tag}", f"vb{tag}", f"{SUBNET}.2")}
    created: list[str] = []
    try:
        for _, (ns, _, _) in hosts.items():
            result = sh("ip", "netns", "add", ns, check=False)
            if result.returncode:
                pytest.skip(f"cannot create a network namespace here: {result.stderr.strip()}")
            created.append(ns)
        veth_a, veth_b = hosts["hosta"][1], hosts["hostb"][1]
        sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        for ns, veth, address in hosts.values():
            sh("ip", "link", "set", veth, "netns", ns)
            script = (
                "ip link set lo up; "
                # only 127.0.0.1 stays local: the rest of 127/8 may now leave by the veth
                "ip addr del 127.0.0.1/8 dev lo; ip addr add 127.0.0.1/32 dev lo; "
                f"sysctl -qw net.ipv4.conf.all.route_localnet=1 "
                f"net.ipv4.conf.{veth}.route_localnet=1; "
                f"ip addr add {address}/24 dev {veth}; ip link set {veth} up"
            )
            sh("ip", "netns", "exec", ns, "sh", "-ec", script)
        agent = tmp_path / "agent.sh"  # what ssh would do: run the command on that host
        cases = "\n".join(f"  {address}|{name}) ns={ns}; name={name} ;;"
                          for name, (ns, _, address) in hosts.items())
        agent.write_text(
            "#!/bin/sh\nhost=$1; shift\ncase \"$host\" in\n"
            f"{cases}\n  *) echo \"agent: unknown host $host\" >&2; exit 255 ;;\nesac\n"
            "exec ip netns exec \"$ns\" unshare --uts sh -c \"hostname $name; $*\"\n")
        agent.chmod(0o755)
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{address} slots=2\n" for _, _, address in hosts.values()))
        yield hosts, agent, hostfile
    finally:
        for ns in created:  # deleting a namespace deletes the veth end inside it
            sh("ip", "netns", "del", ns, check=False)


def veth_bytes(ns: str, veth: str) -> int:
    result = sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{veth}/statistics/tx_bytes")
    return int(result.stdout)


def test_two_hosts_over_tcp_are_bitwise_equal_to_reference(tmp_path, two_hosts, shm_dir,
                                                           reference_runs):
    hosts, agent, hostfile = two_hosts
    ns_a, veth_a, _ = hosts["hosta"]
    run_dir = tmp_path / "run"
    options = ("--epochs", "1", "--batch-size", "48", "--quiet")
    env = mpi_env(shm_dir)
    env.update(
        PRTE_MCA_plm_ssh_agent=str(agent),
        # Open MPI leaves loopback-range interfaces out by default: name the subnet to use.
        PRTE_MCA_oob_tcp_if_include=f"{SUBNET}.0/24",
        OMPI_MCA_btl_tcp_if_include=f"{SUBNET}.0/24",
        OMPI_MCA_btl="self,sm,tcp",
    )
    env.pop("PRTE_MCA_rmaps_default_mapping_policy", None)  # 2 slots a host, as the file says
    before = veth_bytes(ns_a, veth_a)
    command = [
        "ip", "netns", "exec", ns_a, "unshare", "--uts", "sh", "-c",
        'hostname hosta; exec "$@"', "sh",
        MPIRUN, "--hostfile", str(hostfile), "-n", "4",
        # A remote host does not inherit this environment: pass what the ranks need, as the
        # README says to.
        "-x", "OPENBLAS_NUM_THREADS=1",
        *PIPETRAIN, "train", "--transport", "mpi",
        "--run-dir", str(run_dir), *options,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env,
                            cwd=REPO)
    assert result.returncode == 0, (result.stdout, result.stderr)
    ranks = run_state(run_dir)["mpi_ranks"]
    assert [(r["rank"], r["host"]) for r in ranks] == [
        (0, "hosta"), (1, "hosta"), (2, "hostb"), (3, "hostb")], ranks
    # Stage 0 (host A) and stage 1 (host B) exchanged every activation and gradient over TCP.
    assert veth_bytes(ns_a, veth_a) - before > 1_000_000
    reference = reference_runs(*options)
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert_same_steps(run_dir, reference)
    assert_no_survivors(run_dir)
    assert Path(run_dir / "final.npz").exists()

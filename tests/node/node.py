"""A real single-node Kubernetes cluster for the tests, from upstream parts, started and stopped here.

The control plane of tests/cluster (etcd, kube-apiserver with the Node authorizer,
kube-controller-manager with every default controller) listening on the node's bridge, and the
node itself: kube-scheduler, containerd and runc (Debian's), kubelet and kube-proxy (iptables
mode) built from k8s.io/kubernetes at the control plane's version, the CNI plugins (bridge,
host-local, loopback, portmap) and CoreDNS as a pod behind the cluster DNS Service. The images
(pause, CoreDNS, KubeRay's and KServe's controllers, fmforge's runtime and operator) are built by
build-images.sh and imported into containerd's `k8s.io` namespace; nothing is pulled.

Everything it starts is its own: processes by pid (and the containers' by their cgroups under
/fmforge-node), mounts under its directories, the bridge `fmforge0`, iptables chains KUBE-* and
CNI-*, and the sysctls it set are put back. One node at a time (a lock under the cache); a run
that was killed is cleaned up by the next one (its record says what it had made).

    python tests/node/node.py     # start, print the KUBECONFIG line, stop on Ctrl-C or SIGTERM
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "cluster"))
sys.path.insert(0, str(HERE))
from controlplane import ControlPlane, build, free_port  # noqa: E402
from preflight import CACHE, CONTAINERD_ROOT, IMPORT_MARKS, import_mark  # noqa: E402

STATE = CACHE / "node"
BUILD_IMAGES = HERE / "build-images.sh"
NODE_NAME = "fmforge-node"
BRIDGE = "fmforge0"
POD_CIDR = "10.244.0.0/24"
GATEWAY = "10.244.0.1"
SERVICE_CIDR = "10.0.0.0/24"
DNS_IP = "10.0.0.10"
CGROUP_ROOT = "fmforge-node"
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.36.3")
COREDNS_VERSION = os.environ.get("COREDNS_VERSION", "v1.15.0")
PAUSE_IMAGE = f"localhost/fmforge/pause:{K8S_VERSION}"
COREDNS_IMAGE = f"localhost/fmforge/coredns:{COREDNS_VERSION}"
RUNTIME_IMAGE = os.environ.get("RUNTIME_IMAGE", "localhost/fmforge/runtime:dev")
OPERATOR_IMAGE = os.environ.get("OPERATOR_IMAGE", "localhost/fmforge/operator:dev")
#: The sysctls a node needs (or kubelet sets); their values before are put back at stop.
SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/ipv4/conf/all/route_localnet": None,  # kube-proxy sets it
    "vm/overcommit_memory": None, "vm/panic_on_oom": None,  # kubelet sets these
    "kernel/panic": None, "kernel/panic_on_oops": None,
    "kernel/keys/root_maxkeys": None, "kernel/keys/root_maxbytes": None,
}


def _run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


def build_images(what: str) -> dict[str, tuple[str, float]]:
    """Build (or find) the images; {name: (image id, seconds)}."""
    r = subprocess.run([str(BUILD_IMAGES), what], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{BUILD_IMAGES.name} {what} failed:\n{r.stderr[-6000:]}")
    out = {}
    for line in r.stdout.splitlines():
        name, image_id, secs = line.split()
        out[name] = (image_id, float(secs))
    return out


# -- cleaning up: ours only ---------------------------------------------------------------------


def _mounts_under(*prefixes: str) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes if p):
            found.append(point)
    return sorted(set(found), key=lambda p: -p.count("/"))


def unmount_under(*prefixes: str) -> int:
    n = 0
    for _ in range(5):
        points = _mounts_under(*prefixes)
        if not points:
            break
        for p in points:
            if subprocess.run(["umount", p], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", p], capture_output=True)
            n += 1
    return n


def _cgroup_dirs() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    return [d / CGROUP_ROOT for d in sorted(base.iterdir()) if (d / CGROUP_ROOT).is_dir()]


def kill_cgroup_tree() -> int:
    """SIGKILL every process in the node's cgroups (the pods' containers), then remove them."""
    killed = 0
    for _ in range(20):
        pids = set()
        for root in _cgroup_dirs():
            for procs in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    for root in _cgroup_dirs():
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [root]:
            with contextlib.suppress(OSError):
                d.rmdir()
    return killed


def _procs_mentioning(needle: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in p.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def kill_procs_mentioning(needle: str) -> int:
    pids = _procs_mentioning(needle)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def clean_iptables() -> None:
    """Remove the chains kube-proxy, kubelet and the CNI plugins made (KUBE-*, CNI-*) and every
    rule that jumps to them, from both iptables back ends."""
    for tool in ("iptables-nft", "iptables-legacy"):
        if not shutil.which(f"{tool}-save"):
            continue
        dump = subprocess.run([f"{tool}-save"], capture_output=True, text=True).stdout
        if "KUBE-" not in dump and "CNI-" not in dump:
            continue
        out, table = [], None
        for line in dump.splitlines():
            if line.startswith("*"):
                table = line
            ours = ("KUBE-" in line or "CNI-" in line) and not line.startswith("*")
            if not ours:
                out.append(line)
        subprocess.run([f"{tool}-restore"], input="\n".join(out) + "\n", capture_output=True, text=True)
        del table


def set_sysctl(name: str, value: str) -> str | None:
    path = Path("/proc/sys") / name
    try:
        before = path.read_text().strip()
        if value is not None and before != value:
            path.write_text(value)
        return before
    except OSError:
        return None


def cleanup(record: dict) -> list[str]:
    """Undo what a node (this one, or a killed one whose record this is) made; what was done."""
    done = []
    workdir = record.get("workdir", "")
    containerd_state = record.get("containerdState", "")
    for name, pid in (record.get("pids") or {}).items():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if workdir and workdir.encode() in cmd:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            done.append(f"killed {name} ({pid})")
    if containerd_state and (n := kill_procs_mentioning(containerd_state)):
        done.append(f"killed {n} containerd shims")
    if workdir and (n := kill_procs_mentioning(workdir)):
        done.append(f"killed {n} processes of {workdir}")
    if n := kill_cgroup_tree():
        done.append(f"killed {n} container processes")
    if n := unmount_under(workdir, containerd_state, record.get("containerdRoot", "")):
        done.append(f"unmounted {n}")
    if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0:
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        done.append(f"deleted {BRIDGE}")
    for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines():
        # the host ends of the pods' veth pairs that outlived their namespace
        if f"master {BRIDGE}" in line:
            dev = line.split(":")[1].strip().split("@")[0]
            subprocess.run(["ip", "link", "delete", dev], capture_output=True)
    clean_iptables()
    for name, value in (record.get("sysctls") or {}).items():
        if value is not None:
            set_sysctl(name, value)
    if workdir and Path(workdir).exists():
        shutil.rmtree(workdir, ignore_errors=True)
        done.append(f"removed {workdir}")
    return done


# -- the node -------------------------------------------------------------------------------------


@dataclass
class Node:
    """One node and its control plane; `start()` then `stop()` (or use it as a context manager)."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fmforge-node-")))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    images: dict[str, tuple[Path, float]] = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    #: what build-images.sh builds and containerd imports (the base is only the Containerfiles' FROM)
    build_targets: tuple[str, ...] = ("pause", "coredns", "kuberay", "kserve", "operator", "runtime")

    # paths
    @property
    def sock(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def containerd_root(self) -> Path:
        # Kept between runs: the imported images (several GB) are not imported again.
        return CONTAINERD_ROOT

    @property
    def kubeconfig(self) -> Path:
        return self.cp.kubeconfig

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    # -- start ------------------------------------------------------------------------------------

    def start(self) -> Node:
        STATE.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._clean_leftovers()
        t = time.monotonic()
        self.bins = {w: build(w) for w in ("etcd", "k8s", "k8s-node", "cni", "coredns", "pause", "kuberay", "kserve",
                                           "helm")}
        self.timings["build binaries"] = time.monotonic() - t
        t = time.monotonic()
        self.images = {}
        for target in self.build_targets:
            self.images.update(build_images(target))
        self.timings["build images"] = time.monotonic() - t
        t = time.monotonic()
        self.record = {"workdir": str(self.workdir), "containerdState": str(self.workdir / "containerd"),
                       "containerdRoot": str(self.containerd_root), "pids": {}, "sysctls": {}}
        for name, value in SYSCTLS.items():
            self.record["sysctls"][name] = set_sysctl(name, value)
        self._save_record()
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        self.cp = ControlPlane(workdir=self.workdir / "cp", address=GATEWAY, node=True)
        self.cp.workdir.mkdir(parents=True, exist_ok=True)
        self.cp.start()
        self.record["pids"].update({f"cp-{n}": p.pid for n, p in self.cp.procs.items()})
        self._save_record()
        self.timings["control plane"] = time.monotonic() - t
        t = time.monotonic()
        self._containerd()
        self.timings["containerd"] = time.monotonic() - t
        t = time.monotonic()
        self._import_images()
        self.timings["import images"] = time.monotonic() - t
        t = time.monotonic()
        self._kubelet()
        self._scheduler()
        self._kube_proxy()
        self._wait_node_ready()
        self.timings["node ready"] = time.monotonic() - t
        t = time.monotonic()
        self._coredns()
        self.timings["coredns"] = time.monotonic() - t
        return self

    def _lock(self) -> None:
        self._lockf = (STATE / "lock").open("a+")
        try:
            fcntl.flock(self._lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockf.seek(0)
            raise RuntimeError(f"another node is running here: {self._lockf.read().strip()}") from None
        self._lockf.truncate(0)
        self._lockf.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
        self._lockf.flush()

    def _clean_leftovers(self) -> None:
        rec = STATE / "record.json"
        record = json.loads(rec.read_text()) if rec.exists() else {}
        # Even without a record (it is written after the first steps), the fixed names are ours.
        done = cleanup({**record, "containerdRoot": str(self.containerd_root)})
        if done:
            print(f"Cleaned up after a node that did not stop: {'; '.join(done)}", file=sys.stderr)
        rec.unlink(missing_ok=True)

    def _save_record(self) -> None:
        (STATE / "record.json").write_text(json.dumps(self.record, indent=1))

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        out = self.log(name).open("ab")
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=self.workdir, env=env)
        self.procs[name] = p
        self.record["pids"][name] = p.pid
        self._save_record()
        return p

    def _check_alive(self) -> None:
        for name, p in {**self.procs, **self.cp.procs}.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.tail(name)}")

    def wait_for(self, what: str, fn, timeout: float = 120.0, every: float = 0.5):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                last = fn()
            except Exception as e:  # noqa: BLE001 - not yet
                last = e
            if last and not isinstance(last, Exception):
                return last
            time.sleep(every)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}: {last!r}\n{self.logs()}")

    def _kubeconfig_for(self, name: str, cn: str, org: str | None = None) -> Path:
        crt, key = self.cp.pki.client(name, cn, org)
        b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": self.cp.url,
                                                   "certificate-authority-data": b64(self.cp.pki["ca.crt"])}}],
            "users": [{"name": "u", "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        return path

    def ctr(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        return _run("ctr", "--address", str(self.sock), "--namespace", "k8s.io", *args, check=check,
                    timeout=timeout)

    def _containerd(self) -> None:
        d = self.workdir / "containerd"
        (d / "state").mkdir(parents=True, exist_ok=True)
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        self.cni_conf = self.workdir / "cni"
        self.cni_conf.mkdir(exist_ok=True)
        self.cni_conf.joinpath("10-fmforge.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "fmforge",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.workdir / "cni-ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=1))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{self.containerd_root}"
state = "{d / 'state'}"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{d / 'containerd.sock.ttrpc'}"
[debug]
  address = "{d / 'debug.sock'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: without this every sandbox fails in runc ("can't get final
  # child's PID from pipe: EOF") when it lowers the pause process's oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  max_container_log_line_size = 16384
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
  discard_unpacked_layers = false
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = "{shutil.which('runc')}"
[{cri}.cni]
  bin_dir = "{self.bins['cni']}"
  conf_dir = "{self.cni_conf}"
[{cri}.registry]
  config_path = ""
"""
        (d / "config.toml").write_text(config)
        self._spawn("containerd", ["containerd", "--config", str(d / "config.toml"), "--log-level", "warn"])
        self.record["pids"]["containerd"] = self.procs["containerd"].pid
        self.wait_for("containerd", lambda: self.sock.exists() and self.ctr("version", check=False).returncode == 0,
                      timeout=60)

    def _import_images(self) -> None:
        """Stream each image from buildah's storage into containerd, unless containerd has that
        very build already (its image id recorded beside the containerd root)."""
        IMPORT_MARKS.mkdir(exist_ok=True)
        have = set(self.ctr("images", "ls", "-q").stdout.split())
        for name, (image_id, _) in self.images.items():
            mark = import_mark(name)
            if name in have and mark.exists() and mark.read_text() == image_id:
                continue
            t = time.monotonic()
            # buildah's docker-archive piped into ctr (unpacked into the overlayfs snapshots the
            # CRI plugin uses): the image is never written out as a file between them
            push = subprocess.Popen([str(BUILD_IMAGES), "stream", name], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            try:
                imported = subprocess.run(["ctr", "--address", str(self.sock), "--namespace", "k8s.io", "images",
                                           "import", "-"], stdin=push.stdout, capture_output=True, text=True,
                                          timeout=1800)
            finally:
                push.stdout.close()
                pushed = push.wait(timeout=60)
            if pushed != 0 or imported.returncode != 0:
                raise RuntimeError(f"importing {name} into containerd failed: build-images.sh stream exited "
                                   f"{pushed} ({push.stderr.read().decode()[-2000:]}), ctr images import "
                                   f"exited {imported.returncode} ({imported.stderr[-2000:]})")
            # pinned: kubelet's image garbage collection keeps it (it cannot be pulled again)
            self.ctr("images", "label", name, "io.cri-containerd.pinned=pinned", check=False)
            mark.write_text(image_id)
            self.timings[f"import {name}"] = time.monotonic() - t

    def _kubelet(self) -> None:
        # kubelet's cgroupRoot must exist in every hierarchy (cgroup v1 here); pods go below it.
        for d in Path("/sys/fs/cgroup").iterdir():
            if d.is_dir() and d.name != "unified":
                (d / CGROUP_ROOT).mkdir(exist_ok=True)
        kubeconfig = self._kubeconfig_for("kubelet", f"system:node:{NODE_NAME}", "system:nodes")
        self.kubelet_port, self.kubelet_healthz = free_port(), free_port()
        resolv = self.workdir / "resolv.conf"
        # Upstream DNS for CoreDNS (dnsPolicy Default): the host's.
        resolv.write_text(Path("/etc/resolv.conf").read_text())
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # Kubelet 1.35+ refuses cgroup v1 hosts unless told; this machine's controllers are v1.
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "address": GATEWAY, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.kubelet_healthz,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": self.cp.pki["ca.crt"]}},
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local", "clusterDNS": [DNS_IP], "resolvConf": str(resolv),
            "podLogsDir": str(self.workdir / "pod-logs"),
            "failSwapOn": False, "protectKernelDefaults": False,
            # The images cannot be pulled again: never collect them, never evict for disk.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "serializeImagePulls": False, "maxPods": 110,
            "syncFrequency": "10s", "fileCheckFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s", "nodeStatusReportFrequency": "30s",
            "shutdownGracePeriod": "0s",
            # Lowering a process's oom_score_adj needs CAP_SYS_RESOURCE, which root lacks here.
            "oomScoreAdj": 0,
        }
        path = self.workdir / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        root = self.workdir / "kubelet"
        root.mkdir(exist_ok=True)
        self._spawn("kubelet", [
            str(self.bins["k8s-node"] / "kubelet"), f"--config={path}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={root}", f"--cert-dir={root / 'pki'}", f"--node-ip={GATEWAY}",
            f"--hostname-override={NODE_NAME}", "--v=1"])

    def _scheduler(self) -> None:
        self._spawn("kube-scheduler", [
            str(self.bins["k8s-node"] / "kube-scheduler"), f"--kubeconfig={self.cp.kubeconfig}",
            f"--authentication-kubeconfig={self.cp.kubeconfig}", f"--authorization-kubeconfig={self.cp.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--v=1"])

    def _kube_proxy(self) -> None:
        kubeconfig = self._kubeconfig_for("kube-proxy", "system:kube-proxy")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": NODE_NAME,
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "bindAddress": "127.0.0.1", "oomScoreAdj": 0,
            "healthzBindAddress": f"127.0.0.1:{free_port()}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # conntrack sysctls are the host's business; leave them.
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"syncPeriod": "10s", "minSyncPeriod": "1s", "masqueradeAll": False},
        }
        path = self.workdir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        self._spawn("kube-proxy", [str(self.bins["k8s-node"] / "kube-proxy"), f"--config={path}", "--v=1"])

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return self.cp.kubectl(*args, input=input, check=check)

    def _wait_node_ready(self) -> None:
        def ready():
            r = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
            if r.returncode:
                return False
            node = json.loads(r.stdout)
            return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
        self.wait_for(f"node {NODE_NAME} Ready", ready, timeout=120)

    def _coredns(self) -> None:
        docs = coredns_manifests(COREDNS_IMAGE)
        self.kubectl("apply", "--server-side", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
        self.kubectl("rollout", "status", "deployment/coredns", "-n", "kube-system", "--timeout=120s")

    # -- helpers for tests ----------------------------------------------------------------------

    def tail(self, name: str, lines: int = 40) -> str:
        if hasattr(self, "cp") and name in self.cp.procs:
            return self.cp.tail(name, lines)
        try:
            return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def logs(self) -> str:
        names = [*(self.cp.procs if hasattr(self, "cp") else {}), *self.procs]
        return "\n".join(f"--- {n} ---\n{self.tail(n)}" for n in names)

    # -- stop ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        if hasattr(self, "cp"):
            self.cp.stop()
        if self.record:
            cleanup(self.record)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        (STATE / "record.json").unlink(missing_ok=True)
        if getattr(self, "_lockf", None):
            self._lockf.truncate(0)
            fcntl.flock(self._lockf, fcntl.LOCK_UN)
            self._lockf.close()
            self._lockf = None

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def coredns_manifests(image: str) -> list[dict]:
    """CoreDNS as clusters run it: a Deployment in kube-system behind the `kube-dns` Service at
    the kubelet's clusterDNS address, with the RBAC of its kubernetes plugin."""
    labels = {"k8s-app": "kube-dns"}
    corefile = """.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    forward . /etc/resolv.conf
    cache 30
    loop
    loadbalance
}
"""
    meta = {"name": "coredns", "namespace": "kube-system"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {**meta, "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {
                 "serviceAccountName": "coredns", "dnsPolicy": "Default",
                 "priorityClassName": "system-cluster-critical",
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 65535,
                                     "seccompProfile": {"type": "RuntimeDefault"},
                                     # port 53 as non-root
                                     "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}]},
                 "containers": [{
                     "name": "coredns", "image": image, "imagePullPolicy": "Never",
                     "args": ["-conf", "/etc/coredns/Corefile"],
                     "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "170Mi"}},
                     "ports": [{"containerPort": 53, "name": "dns", "protocol": "UDP"},
                               {"containerPort": 53, "name": "dns-tcp", "protocol": "TCP"}],
                     "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                     "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
                     "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                     "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                         "capabilities": {"drop": ["ALL"]}},
                 }],
                 "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
             }}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system",
                                                             "labels": labels},
         "spec": {"clusterIP": DNS_IP, "selector": labels,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
    ]


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    node = Node()
    try:
        node.start()
        print(f"Node {NODE_NAME} up: " + ", ".join(f"{k} {v:.1f}s" for k, v in node.timings.items()))
        print(f"export KUBECONFIG={node.kubeconfig}")
        print(f"kubectl: {node.cp.kubectl_path}    logs: {node.workdir}/*.log    Ctrl-C stops it")
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

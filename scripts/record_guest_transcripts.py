#!/usr/bin/env python3
"""Records what a real Debian 12 guest answers to the commands sombrero's build and validation
run, into tests/transcripts/debian-12/{build,clone}.json (see scripts/record-guest-transcripts.sh).

The guest is the cached image of scripts/real-guest-image.sh, booted directly under QEMU the way
a Proxmox node would run it: a qcow2 overlay as the build VM's disk (resized to 10 GiB), a NoCloud
`cidata` ISO as PVE generates it from `ciuser`/`sshkeys`/`ipconfig0`, user-mode networking with
SSH forwarded to a loopback port, the apt repository reached at 10.0.2.100:80 (a guestfwd to a
loopback HTTP server), the guest agent on a virtio-serial socket, shutdown by ACPI over QMP.

Phase `build` runs the build's recipe over SSH as the cloud-init user (sudo -n), exactly the
lines sombrero sends; phase `clone` boots a linked clone of the cleaned disk (overlay, new
instance-id, new key) and runs validation's commands through the real qemu-guest-agent, with
PVE's wrapping (out-data/err-data decoded; a QGA error as PVE's "Agent error: <desc>").

Each entry says how a replay against the guest model compares it (tests/integration/fakepve_harness.rs):
`exact` (after `normalise`), `exitcode`, `lines` (each regex of `lines` matches both), `json-keys`.
Also usable as a relay for QEMU's guestfwd: record_guest_transcripts.py --relay HOST PORT.
"""

import argparse
import base64
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

USER = 'sombrero'
APT = ('DEBIAN_FRONTEND=noninteractive UCF_FORCE_CONFFOLD=1 apt-get -o Dpkg::Options::=--force-confdef '
       '-o Dpkg::Options::=--force-confold')
DPKG_FORMAT = '${db:Status-Abbrev}\\t${Package}\\t${Version}\\n'
DOTS = [r'^\.+', '']  # cloud-init status --wait prints a dot per quarter second it waited
MACHINE_ID = [r'[0-9a-f]{32}', '<machine-id>']


def log(*a):
    print('record:', *a, file=sys.stderr, flush=True)


def relay(host, port):
    """guestfwd's cmd: one guest connection on stdin/stdout, relayed to host:port."""
    s = socket.create_connection((host, int(port)))

    def up():
        while True:
            data = os.read(0, 65536)
            if not data:
                s.shutdown(socket.SHUT_WR)
                return
            s.sendall(data)
    threading.Thread(target=up, daemon=True).start()
    while True:
        data = s.recv(65536)
        if not data:
            return
        os.write(1, data)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def serve_repo(directory):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=directory)
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def cidata(directory, name, instance_id, public_key):
    """A NoCloud drive as PVE's nocloud type writes it (ciuser, sshkeys, ipconfig0=ip=dhcp)."""
    d = os.path.join(directory, 'cidata-' + name)
    os.makedirs(d)
    user_data = ('#cloud-config\nhostname: {0}\nmanage_etc_hosts: true\nfqdn: {0}\nuser: {1}\n'
                 'ssh_authorized_keys:\n  - {2}\nchpasswd:\n  expire: False\nusers:\n  - default\n'
                 'package_upgrade: false\n').format(name, USER, public_key)
    network = ("version: 1\nconfig:\n    - type: physical\n      name: eth0\n"
               "      mac_address: 'bc:24:11:00:00:01'\n      subnets:\n      - type: dhcp4\n"
               "    - type: nameserver\n      address:\n      - '10.0.2.3'\n")
    for f, text in (('user-data', user_data), ('network-config', network),
                    ('meta-data', 'instance-id: {0}\n'.format(instance_id))):
        with open(os.path.join(d, f), 'w') as fh:
            fh.write(text)
    iso = d + '.iso'
    subprocess.run(['xorriso', '-as', 'mkisofs', '-quiet', '-o', iso, '-V', 'cidata', '-J', '-R', d], check=True)
    return iso


class Vm(object):
    def __init__(self, directory, disk, iso, repo_port, ssh_port):
        self.dir = directory
        self.qga = os.path.join(directory, 'qga.sock')
        self.qmp = os.path.join(directory, 'qmp.sock')
        for p in (self.qga, self.qmp):
            if os.path.exists(p):
                os.unlink(p)
        self.ssh_port = ssh_port
        argv = ['qemu-system-x86_64', '-nodefaults', '-no-user-config', '-display', 'none', '-machine', 'pc',
                '-accel', 'tcg,thread=multi', '-cpu', 'qemu64', '-smp', '2', '-m', '2048',
                '-serial', 'file:' + os.path.join(directory, 'console-{0}.log'.format(os.path.basename(iso))),
                '-qmp', 'unix:{0},server=on,wait=off'.format(self.qmp),
                '-chardev', 'socket,id=qga0,path={0},server=on,wait=off'.format(self.qga),
                '-device', 'virtio-serial', '-device', 'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
                '-device', 'virtio-scsi-pci,id=scsihw0',
                '-drive', 'file={0},if=none,id=d0,format=qcow2,cache=unsafe,discard=unmap'.format(disk),
                '-device', 'scsi-hd,bus=scsihw0.0,drive=d0,bootindex=100',
                '-drive', 'file={0},if=none,id=ci,media=cdrom,format=raw,readonly=on'.format(iso),
                '-device', 'ide-cd,bus=ide.0,unit=0,drive=ci',
                '-netdev', 'user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{0}-:22,guestfwd=tcp:10.0.2.100:80-cmd:{1} {2} '
                '--relay 127.0.0.1 {3}'.format(ssh_port, sys.executable, os.path.abspath(__file__), repo_port),
                '-device', 'virtio-net-pci,netdev=n0,mac=bc:24:11:00:00:01']
        self.started = time.time()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(os.path.join(directory, 'qemu.log'), 'ab'),
                                     stderr=subprocess.STDOUT)

    def powerdown(self, timeout=180):
        """ACPI shutdown (QMP system_powerdown), as PVE does without a running agent."""
        started = time.time()
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.qmp)
        f = s.makefile('rw')
        f.readline()
        for cmd in ('qmp_capabilities', 'system_powerdown'):
            f.write(json.dumps({'execute': cmd}) + '\n')
            f.flush()
            f.readline()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log('no ACPI shutdown within {0}s; killing QEMU'.format(timeout))
            self.proc.kill()
            self.proc.wait()
        return time.time() - started

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Qga(object):
    """The guest agent protocol as PVE's QMPClient speaks it: guest-sync-delimited, then the command."""

    def __init__(self, path):
        self.path = path
        self.seq = int(time.time()) % 100000

    def call(self, execute, arguments=None, timeout=10):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        try:
            s.connect(self.path)
            self.seq += 1
            s.sendall(b'\xff' + json.dumps({'execute': 'guest-sync-delimited', 'arguments': {'id': self.seq}}).encode()
                      + b'\n' + json.dumps({'execute': execute, 'arguments': arguments or {}}).encode() + b'\n')
            buf = b''
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError('agent closed the connection')
                buf += chunk
                if not buf.endswith(b'\n'):
                    continue
                # Answers to an earlier, timed-out connection may come first: ours follows the
                # 0xFF that precedes the answer to our own sync id.
                for segment in buf.split(b'\xff')[1:]:
                    lines = [ln for ln in segment.split(b'\n') if ln.strip()]
                    if len(lines) >= 2 and json.loads(lines[0]).get('return') == self.seq:
                        return json.loads(lines[1])
        finally:
            s.close()

    def wait(self, limit):
        started = time.time()
        while time.time() - started < limit:
            try:
                if 'return' in self.call('guest-ping', timeout=3):
                    return time.time() - started
            except (OSError, ValueError):
                time.sleep(1)
        raise SystemExit('the guest agent did not answer within {0}s'.format(limit))

    def pve(self, command, arguments=None):
        """(data, PVE's error message): a QGA error is PVE's 500 "Agent error: <desc>"."""
        answer = self.call('guest-' + command, arguments, timeout=60)
        if 'error' in answer:
            return None, 'Agent error: {0}'.format(answer['error'].get('desc', ''))
        return answer['return'], None

    def exec(self, argv, limit=900):
        started, err = self.pve('exec', {'path': argv[0], 'arg': argv[1:], 'capture-output': True})
        if err:
            return {'agent_error': err, 'exitcode': None, 'stdout': '', 'stderr': ''}
        pid = started['pid']
        t0 = time.time()
        while time.time() - t0 < limit:
            st, err = self.pve('exec-status', {'pid': pid})
            if err:
                raise SystemExit('exec-status of {0}: {1}'.format(argv, err))
            if st.get('exited'):
                def text(key):
                    return base64.b64decode(st[key]).decode('utf-8', 'replace') if st.get(key) else ''
                return {'agent_error': None, 'exitcode': st.get('exitcode'), 'stdout': text('out-data'),
                        'stderr': text('err-data'), 'secs': round(time.time() - t0, 1)}
            time.sleep(0.5)
        raise SystemExit('{0} still running after {1}s'.format(argv, limit))


def ssh_argv(key, port, line):
    # One connection for every command, as sombrero's build keeps one SSH session: once the host
    # keys are removed (a clean step), sshd accepts no new connection, but the open one goes on.
    return ['ssh', '-i', key, '-p', str(port), '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null',
            '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=5', '-o', 'LogLevel=ERROR', '-o', 'ControlMaster=auto',
            '-o', 'ControlPath={0}.ctl-%p'.format(key), '-o', 'ControlPersist=600', USER + '@127.0.0.1', line]


def wait_ssh(key, port, limit):
    started = time.time()
    while time.time() - started < limit:
        r = subprocess.run(ssh_argv(key, port, 'true'), capture_output=True, timeout=60)
        if r.returncode == 0:
            return time.time() - started
        time.sleep(2)
    raise SystemExit('SSH did not accept the key within {0}s'.format(limit))


def entry(via, command, result, compare, **extra):
    e = {'via': via, 'command': command, 'exitcode': result['exitcode'], 'stdout': result['stdout'],
         'stderr': result['stderr'], 'compare': compare}
    if result.get('agent_error'):
        e['agent_error'] = result['agent_error']
    e.update(extra)
    return e


def record(cache, out_dir, keep):
    work = tempfile.mkdtemp(prefix='sombrero-transcripts-')
    vm = None
    timings = {}
    try:
        # A private copy: a rebuild of the cache meanwhile (a new repository key) must not mix
        # an old image with a new repository.
        snapshot = os.path.join(work, 'cache')
        shutil.copytree(cache, snapshot)
        cache = snapshot
        repo_port = serve_repo(os.path.join(cache, 'repo'))
        key = os.path.join(work, 'key')
        subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'sombrero-build', '-f', key], check=True)
        pub = open(key + '.pub').read().strip()
        disk = os.path.join(work, 'build.qcow2')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', os.path.join(cache, 'debian-12.qcow2'),
                        '-F', 'qcow2', disk, '10G'], check=True)

        # ---------------------------------------------------------------- build (SSH)
        port = free_port()
        vm = Vm(work, disk, cidata(work, 'build', 'build-0001', pub), repo_port, port)
        timings['boot to SSH'] = round(wait_ssh(key, port, 600), 1)
        log('build VM: SSH after {0}s'.format(timings['boot to SSH']))
        build = []

        def ssh(line, compare='exact', timeout=5400, **extra):
            t0 = time.time()
            r = subprocess.run(ssh_argv(key, port, line), capture_output=True, timeout=timeout)
            res = {'exitcode': r.returncode, 'stdout': r.stdout.decode('utf-8', 'replace'),
                   'stderr': r.stderr.decode('utf-8', 'replace')}
            secs = round(time.time() - t0, 1)
            log('ssh {0!r}: exit {1} in {2}s'.format(line[:70], r.returncode, secs))
            build.append(entry('ssh', line, res, compare, secs=secs, **extra))
            return res

        dpkg = "dpkg-query -W -f='{0}'".format(DPKG_FORMAT)
        ssh('sudo -n cloud-init status --wait', normalise=[DOTS])
        ssh('cloud-init status --format json', 'json-keys')
        # The image as shipped: the Debian 12 profile of tests/fakepve/guest.py is made from it.
        ssh(dpkg, 'lines', lines=[r'(?m)^ii \tcloud-init\t', r'(?m)^ii \tlinux-image-6\.1\.0-50-cloud-amd64\t'],
            phase='image')
        ssh('sudo -n apt-get update', 'exitcode')
        ssh('uname -r')
        ssh('cat /etc/os-release')
        # `upgrade --with-new-pkgs` keeps the new kernel back too (apt 2.6, measured); full-upgrade
        # installs it.
        ssh('apt-get -s upgrade --with-new-pkgs', 'lines', lines=[r'kept back:\n.*linux-image-cloud-amd64'])
        ssh('apt-get -s full-upgrade', 'lines', lines=[r'Inst linux-image-6\.1\.0-57-cloud-amd64 '])
        ssh('apt-get -s install qemu-guest-agent cloud-init jq', 'lines', lines=[r'Inst qemu-guest-agent '])
        # Plain `upgrade` keeps the new kernel back (issue 13's first bug), simulated only.
        ssh('apt-get -s upgrade', 'lines', lines=[r'kept back:\n.*linux-image-cloud-amd64'])
        ssh('sudo -n {0} full-upgrade -y'.format(APT), 'lines',
            lines=[r'linux-image-6\.1\.0-57-cloud-amd64', r'0 to remove and 0 not upgraded'])
        ssh('sudo -n {0} install -y qemu-guest-agent cloud-init'.format(APT), 'lines',
            lines=[r'Setting up qemu-guest-agent', r'cloud-init is already the newest version',
                   r'0 upgraded, 4 newly installed, 0 to remove and 0 not upgraded'])
        ssh('systemctl is-enabled qemu-guest-agent')
        ssh('systemctl is-active qemu-guest-agent')
        ssh('sudo -n systemctl enable qemu-guest-agent cloud-init')
        ssh('systemctl is-enabled qemu-guest-agent')
        ssh('systemctl is-enabled cloud-init')
        ssh('systemctl is-active ssh')
        ssh('systemctl is-active sshd')
        ssh('systemctl is-enabled sshd')
        ssh('systemctl is-enabled ssh')
        ssh('systemctl is-active nosuch')
        ssh('systemctl is-enabled nosuch')
        ssh('frobnicate')
        ssh('echo out; echo err >&2; exit 3')
        ssh('sudo -n apt-get clean')
        ssh('sudo -n {0} autoremove -y'.format(APT), 'lines', lines=[r'0 upgraded, 0 newly installed'])
        ssh(dpkg, 'lines', lines=[r'(?m)^ii \tqemu-guest-agent\t', r'(?m)^ii \tcloud-init\t',
                                  r'(?m)^ii \tlinux-image-6\.1\.0-57-cloud-amd64\t',
                                  r'(?m)^ii \tlinux-image-6\.1\.0-50-cloud-amd64\t'])
        ssh('sudo -n cloud-init clean --logs')
        ssh('sudo -n truncate -s 0 /etc/machine-id')
        ssh('sudo -n rm -f /etc/ssh/ssh_host_*')
        ssh('sudo -n rm -f /home/{0}/.ssh/authorized_keys'.format(USER))
        ssh('sync')
        timings['ACPI shutdown'] = round(vm.powerdown(), 1)
        vm = None

        # ---------------------------------------------------------------- clone (agent)
        clone_disk = os.path.join(work, 'clone.qcow2')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', disk, '-F', 'qcow2', clone_disk], check=True)
        subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'sombrero-validation', '-f', key + '2'],
                       check=True)
        port = free_port()
        vm = Vm(work, clone_disk, cidata(work, 'clone', 'clone-0001', open(key + '2.pub').read().strip()),
                repo_port, port)
        qga = Qga(vm.qga)
        timings['clone boot to agent'] = round(qga.wait(600), 1)
        log('clone: agent after {0}s'.format(timings['clone boot to agent']))
        clone = []

        def agent(argv, compare='exact', **extra):
            res = qga.exec(argv)
            log('agent {0}: exit {1} {2}'.format(argv[:4], res['exitcode'], res['agent_error'] or ''))
            clone.append(entry('agent', argv, res, compare, **extra))
            return res

        def agent_call(command, compare='json-keys'):
            data, err = qga.pve(command)
            clone.append({'via': 'agent-call', 'command': command, 'result': data, 'agent_error': err,
                          'compare': compare})

        agent_call('ping', 'exact')
        agent(['cloud-init', 'status', '--wait'], normalise=[DOTS])
        agent(['cloud-init', 'status', '--format', 'json'], 'json-keys')
        agent(['systemctl', 'is-active', 'ssh'])
        agent(['systemctl', 'is-active', 'sshd'])
        agent(['systemctl', 'is-enabled', 'qemu-guest-agent'])
        agent(['systemctl', 'is-active', 'qemu-guest-agent'])
        agent(['dpkg-query', '-W', '-f=' + DPKG_FORMAT], 'lines',
              lines=[r'(?m)^ii \tqemu-guest-agent\t', r'(?m)^ii \tlinux-image-6\.1\.0-57-cloud-amd64\t'])
        agent(['frobnicate'])
        agent(['/bin/sh', '-c', 'frobnicate'])
        agent(['/bin/sh', '-c', 'echo out; echo err >&2; exit 3'])
        agent(['uname', '-r'])  # the new kernel: full-upgrade installed it, GRUB boots the newest
        agent(['cat', '/etc/machine-id'], normalise=[MACHINE_ID])
        agent(['apt-get', 'remove', '-y', 'linux-image-6.1.0-50-cloud-amd64'], 'exitcode')
        agent(['dpkg-query', '-W', '-f=' + DPKG_FORMAT], 'lines',
              lines=[r'(?m)^rc \tlinux-image-6\.1\.0-50-cloud-amd64\t', r'(?m)^ii \tlinux-image-6\.1\.0-57-cloud-amd64\t'])
        agent_call('get-osinfo')
        agent_call('network-get-interfaces')
        timings['clone ACPI shutdown'] = round(vm.powerdown(), 1)
        vm = None

        os.makedirs(out_dir, exist_ok=True)
        meta = {'recorded_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'image': dict(
            line.split('=', 1) for line in open(os.path.join(cache, 'image.env')).read().splitlines()
            if '=' in line and not line.startswith('#')), 'seconds': timings,
            'accel': 'tcg', 'recorder': 'scripts/record-guest-transcripts.sh'}
        for name, entries in (('build', build), ('clone', clone)):
            with open(os.path.join(out_dir, name + '.json'), 'w') as f:
                json.dump({'meta': meta, 'entries': entries}, f, indent=1, ensure_ascii=False)
                f.write('\n')
        log('wrote {0}/build.json and clone.json; timings {1}'.format(out_dir, timings))
    finally:
        if vm is not None:
            vm.kill()
        if keep:
            log('kept ' + work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--relay', nargs=2)
    ap.add_argument('--cache')
    ap.add_argument('--out')
    ap.add_argument('--keep', action='store_true')
    a = ap.parse_args()
    if a.relay:
        relay(*a.relay)
        return
    # A terminated recorder still kills its QEMU (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    record(a.cache, a.out, a.keep)


if __name__ == '__main__':
    main()

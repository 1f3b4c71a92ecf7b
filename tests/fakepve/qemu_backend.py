"""Real guests behind the fake Proxmox VE: `harness.py --real-guest CACHE_DIR`.

In this mode a VM whose disk is a real file is a real QEMU process, wired as a Proxmox node wires
it; fakepve keeps the API, schema checks, tasks and locks, and this module replaces only what the
guest model (guest.py) did:

- disks are qcow2 files under the harness directory: `import-from` is `qemu-img convert`, resize is
  `qemu-img resize`, a template's disks become read-only bases, a linked clone is an overlay
  (`qemu-img create -b`), a full clone a copy;
- the cloud-init drive is a NoCloud `cidata` ISO generated at start from `ciuser`, `sshkeys`,
  `ipconfig0`, `nameserver`, `searchdomain`, `ciupgrade` as PVE generates it (instance-id: a digest
  of what it holds, so every VM and every change gets a new one);
- the guest agent endpoints are answered by the real qemu-guest-agent over a virtio-serial unix
  socket, with PVE's wrapping (ping before every command, base64 decoded out-data/err-data, QGA
  errors as HTTP 500 "VM N qmp command 'guest-X' failed - ...");
- networking is QEMU user mode, isolated (restrict=on). The guest is 10.0.2.15 behind a 1:1 NAT:
  the VM's address for sombrero is the loopback address of its `ipconfig0` (`ip=127.x.y.z/n`, as
  with the guest model), where a hostfwd on the harness's SSH port reaches the guest's port 22;
  inside the guest that static address reads 10.0.2.15/24 via 10.0.2.2, and the agent's
  network-get-interfaces reports the loopback address back (what a routed network would show).
  The guest reaches only the cached apt repository, at 10.0.2.100:80 (a guestfwd to a loopback
  HTTP server of the harness);
- shutdown is ACPI (`system_powerdown` over QMP), stop kills the process; a guest that powers
  itself off stops the VM.

Every QEMU process dies with the harness: each gets PR_SET_PDEATHSIG (SIGKILL) and is killed on
stop. TCG unless /dev/kvm boots a kernel (probed once at start).
"""

import asyncio
import base64
import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

from aiohttp import web

from fakepve import PveError, TaskError
from fakepve.qemu import drives_of, is_cdrom, split_drive

LOG = logging.getLogger('fakepve-harness.qemu')
GUEST_IP = '10.0.2.15'
GUEST_GW = '10.0.2.2'
GUEST_DNS = '10.0.2.3'
REPO_ADDR = ('10.0.2.100', 80)
PR_SET_PDEATHSIG = 1
# How long PVE waits for the agent's ping before "QEMU guest agent is not running".
PING_TIMEOUT = 3.0
# PVE's timeout of an agent command (most are 10 s; exec-status answers at once).
COMMAND_TIMEOUT = 10.0

RELAY = r'''
import os, select, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
fds = {0: s.fileno(), s.fileno(): 1}
while fds:
    for fd in select.select(list(fds), [], [])[0]:
        data = os.read(fd, 65536)
        if not data:
            sys.exit(0)
        os.write(fds[fd], data)
'''


def die_with_parent():
    """preexec_fn: the child gets SIGKILL when the harness dies, however it dies."""
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def missing_prerequisites(cache_dir):
    """What is missing to run real guests, each with the command that gets it."""
    out = []
    for tool, pkg in (('qemu-system-x86_64', 'qemu-system-x86'), ('qemu-img', 'qemu-utils'),
                      ('xorriso', 'xorriso')):
        if shutil.which(tool) is None:
            out.append('{0} not found: apt-get install -y {1} (or run scripts/real-guest-image.sh)'.format(tool, pkg))
    for name in ('debian-12.qcow2', 'repo/InRelease', 'image.env'):
        if not os.path.exists(os.path.join(cache_dir, name)):
            out.append('{0} not in {1}: run scripts/real-guest-image.sh'.format(name, cache_dir))
    return out


def loopback_ip(value):
    for part in str(value or '').split(','):
        if part.startswith('ip=') and '/' in part:
            ip = part[3:].split('/', 1)[0]
            if ip.startswith('127.'):
                return ip
    return None


def ipconfig(value):
    """PVE's ipconfigN as a dict (ip, gw, ip6, gw6)."""
    out = {}
    for part in str(value or '').split(','):
        if '=' in part:
            k, v = part.split('=', 1)
            out[k.strip()] = v.strip()
    return out


def mac_of(net):
    for part in str(net or '').split(','):
        if '=' in part and re.match(r'^[0-9A-Fa-f:]{17}$', part.split('=', 1)[1]):
            return part.split('=', 1)[1].lower()
    return None


def yaml_str(s):
    return "'" + str(s).replace("'", "''") + "'"


def nocloud(vm_config, vmid):
    """user-data, network-config and meta-data of the VM's cloud-init drive, as PVE's
    PVE::QemuServer::Cloudinit generates them for the nocloud type (the guest's own addresses
    are the NAT's, see the module docstring)."""
    name = str(vm_config.get('name') or 'VM{0}'.format(vmid))
    lines = ['#cloud-config', 'hostname: {0}'.format(name), 'manage_etc_hosts: true', 'fqdn: {0}'.format(name)]
    if vm_config.get('ciuser'):
        lines.append('user: {0}'.format(vm_config['ciuser']))
    if vm_config.get('cipassword'):
        lines.append('password: {0}'.format(vm_config['cipassword']))
    keys = [k.strip() for k in urllib.parse.unquote(str(vm_config.get('sshkeys') or '')).splitlines()
            if k.strip() and not k.strip().startswith('#')]
    if keys:
        lines.append('ssh_authorized_keys:')
        lines.extend('  - {0}'.format(k) for k in keys)
    lines += ['chpasswd:', '  expire: False', 'users:', '  - default']
    if str(vm_config.get('ciupgrade', '1')) in ('1', 'true'):
        lines.append('package_upgrade: true')
    user_data = '\n'.join(lines) + '\n'

    net = ['version: 1', 'config:']
    for n in range(4):
        if 'net{0}'.format(n) not in vm_config:
            continue
        ipc = ipconfig(vm_config.get('ipconfig{0}'.format(n)))
        net += ['    - type: physical', '      name: eth{0}'.format(n)]
        mac = mac_of(vm_config.get('net{0}'.format(n)))
        if mac:
            net.append("      mac_address: '{0}'".format(mac))
        subnets = []
        ip = ipc.get('ip')
        if n == 0 and ip and ip not in ('dhcp',) and ip.startswith('127.'):
            # The NAT: sombrero's 127.x.y.z is the guest's 10.0.2.15 (user-mode networking).
            subnets += ['      - type: static', "        address: '{0}'".format(GUEST_IP),
                        "        netmask: '255.255.255.0'", "        gateway: '{0}'".format(GUEST_GW)]
        elif ip == 'dhcp' or (ip is None and n == 0):
            subnets.append('      - type: dhcp4')
        elif ip:
            subnets += ['      - type: static', "        address: '{0}'".format(ip.split('/')[0])]
            if ipc.get('gw'):
                subnets.append("        gateway: '{0}'".format(ipc['gw']))
        if subnets:
            net.append('      subnets:')
            net += subnets
    dns = str(vm_config.get('nameserver') or GUEST_DNS).split()
    net += ['    - type: nameserver', '      address:'] + ["      - '{0}'".format(d) for d in dns]
    if vm_config.get('searchdomain'):
        net += ['      search:'] + ["      - '{0}'".format(d) for d in str(vm_config['searchdomain']).split()]
    network_config = '\n'.join(net) + '\n'
    digest = hashlib.sha1((str(vmid) + user_data + network_config).encode()).hexdigest()
    meta_data = 'instance-id: {0}\n'.format(digest)
    return user_data, network_config, meta_data


async def run(*argv, check=True):
    """A helper command (qemu-img, xorriso) without blocking the event loop."""
    # stdin never the harness's: QEMU makes its stdin non-blocking, which the stdin watch reads as EOF.
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent)
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise TaskError('{0} failed: {1}'.format(argv[0], (err or out).decode(errors='replace').strip()))
    return out.decode(errors='replace')


class QgaError(Exception):
    def __init__(self, desc, klass='GenericError'):
        super().__init__(desc)
        self.desc = desc
        self.klass = klass


class Guest(object):
    """One running QEMU process."""

    def __init__(self, vmid, directory):
        self.vmid = vmid
        self.dir = directory
        self.proc = None
        self.watcher = None
        self.qga_lock = asyncio.Lock()
        self.started = time.time()
        self.qga_reader = None
        self.qga_writer = None

    def path(self, name):
        return os.path.join(self.dir, name)


class QemuBackend(object):
    def __init__(self, harness, cache_dir, workdir):
        self.h = harness
        self.cache = os.path.abspath(cache_dir)
        self.dir = os.path.join(os.path.abspath(workdir), 'real-guest')
        self.guests = {}
        self.pending = []
        self.clone_full = {}
        self.repo_runner = None
        self.repo_port = None
        self.repo_requests = 0
        self.accel = 'tcg'
        self.stats = []
        self.boots = []

    # ------------------------------------------------------------ lifecycle

    async def start(self):
        missing = missing_prerequisites(self.cache)
        if missing:
            raise SystemExit('fakepve harness --real-guest: ' + '; '.join(missing))
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, 'relay.py'), 'w') as f:
            f.write(RELAY)
        app = web.Application(middlewares=[self._count])
        app.router.add_static('/', os.path.join(self.cache, 'repo'), show_index=False)
        self.repo_runner = web.AppRunner(app, access_log=None)
        await self.repo_runner.setup()
        site = web.TCPSite(self.repo_runner, self.h.host, 0)
        await site.start()
        self.repo_port = self.repo_runner.addresses[0][1]
        self.accel = await self.probe_accel()
        LOG.info('real guests: accel %s, apt repository on %s:%s', self.accel, self.h.host, self.repo_port)

    @web.middleware
    async def _count(self, request, handler):
        # Logged with its time so a slow apt step can be told from a slow guest.
        self.repo_requests += 1
        start = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            secs = time.monotonic() - start
            (LOG.warning if secs > 5 else LOG.info)('apt repository: %s %s -> %s in %.2fs', request.method,
                                                    request.path, status, secs)

    async def stop(self):
        await self.stop_all()
        if self.repo_runner:
            await self.repo_runner.cleanup()

    async def stop_all(self):
        for g in list(self.guests.values()):
            self.kill(g)
            await g.proc.wait()

    def handoff(self):
        return {'accel': self.accel, 'repo': 'http://{0}:{1}/'.format(self.h.host, self.repo_port)}

    def fallback_ip(self, vmid):
        """The outside address of a VM without a loopback ipconfig0: 127.<host's>.<vmid>."""
        parts = [int(p) for p in self.h.host.split('.')]
        return '127.{0}.{1}.{2}'.format(parts[1], parts[2] ^ 0x40, 1 + vmid % 250)

    async def add_image(self, filename, path):
        """A real image the harness serves for download-url (checksums as for modelled ones)."""
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise ValueError('{0}: no such file (run scripts/real-guest-image.sh)'.format(path))
        loop = asyncio.get_running_loop()

        def sums():
            hashes = dict((a, hashlib.new(a)) for a in ('md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512'))
            with open(path, 'rb') as f:
                for chunk in iter(lambda: f.read(1 << 20), b''):
                    for h in hashes.values():
                        h.update(chunk)
            return dict((a, h.hexdigest()) for a, h in hashes.items())
        checksums = await loop.run_in_executor(None, sums)
        info = json.loads(await run('qemu-img', 'info', '--output=json', path))
        size = os.path.getsize(path)
        self.h.images[filename] = {'file': path, 'size': size, 'virtual_size': int(info['virtual-size']),
                                   'sha256': checksums['sha256']}
        return {'filename': filename, 'size': size, 'virtual_size': int(info['virtual-size']), 'checksums': checksums,
                'url': 'http://{0}:{1}/images/{2}'.format(self.h.host, self.h.control_port,
                                                          urllib.parse.quote(filename))}

    def routes(self, router):
        router.add_get('/real-guest', self.c_status)
        router.add_get('/real-guest/console/{vmid}', self.c_console)

    async def c_status(self, request):
        disks = {}
        for sid, store in self.h.pve.storages.items():
            for name, vol in store.get('volumes', {}).items():
                if self.is_real(vol) and os.path.exists(vol['_qemu_file']):
                    actual, virtual = self.disk_sizes(vol)
                    disks['{0}:{1}'.format(sid, name)] = {'actual': actual, 'virtual': virtual}
        for boot in self.boots:
            g = self.guests.get(boot['vmid'])
            if boot['stopped'] is None and g is not None:
                boot['kernel'] = self.booted_kernel(g)
        return web.json_response({'accel': self.accel, 'repo_requests': self.repo_requests, 'stats': self.stats,
                                  'boots': self.boots, 'disks': disks,
                                  'running': sorted(g.vmid for g in self.guests.values())})

    async def c_console(self, request):
        path = os.path.join(self.dir, 'vm-{0}'.format(int(request.match_info['vmid'])), 'console.log')
        if not os.path.exists(path):
            raise web.HTTPNotFound()
        with open(path, 'rb') as f:
            return web.Response(text=f.read().decode('utf-8', errors='replace'))

    async def probe_accel(self):
        """KVM only if a kernel really boots with it (nested PVM answers KVM_CREATE_VM, yet QEMU
        aborts on an MSR or hangs): boot the image's kernel for up to 20 s and look for its banner."""
        if os.environ.get('SOMBRERO_REAL_GUEST_ACCEL') in ('tcg', 'kvm'):
            return os.environ['SOMBRERO_REAL_GUEST_ACCEL']
        if not os.access('/dev/kvm', os.R_OK | os.W_OK):
            return 'tcg'
        kernel = os.path.join(self.cache, 'vmlinuz')
        if not os.path.exists(kernel):
            return 'tcg'
        proc = await asyncio.create_subprocess_exec(
            'qemu-system-x86_64', '-accel', 'kvm', '-cpu', 'host', '-m', '256', '-nodefaults', '-display', 'none',
            '-no-reboot', '-serial', 'stdio', '-kernel', kernel, '-append', 'console=ttyS0 panic=-1',
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=die_with_parent)
        seen = b''
        try:
            deadline = time.time() + 20
            while time.time() < deadline and b'Kernel panic' not in seen and b'Run /init' not in seen:
                chunk = await asyncio.wait_for(proc.stdout.read(4096), max(0.1, deadline - time.time()))
                if not chunk:
                    break
                seen += chunk
        except asyncio.TimeoutError:
            pass
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        ok = b'Linux version' in seen and (b'Kernel panic' in seen or b'Run /init' in seen)
        LOG.info('KVM probe: %s', 'a kernel booted' if ok else 'no kernel booted, using TCG')
        return 'kvm' if ok else 'tcg'

    # ------------------------------------------------------------ disks

    def file_for(self, volid):
        return os.path.join(self.dir, 'disks', re.sub(r'[^A-Za-z0-9_.-]', '_', volid) + '.qcow2')

    def is_real(self, vol):
        return bool(vol) and vol.get('_qemu_file') is not None

    def store_download(self, storage, filename, data):
        """A downloaded import file lands on disk (download-url of a real image)."""
        path = os.path.join(self.dir, 'storage', storage, filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)
        info = json.loads(subprocess.run(['qemu-img', 'info', '--output=json', path], check=True,
                                         capture_output=True).stdout)
        return path, int(info['virtual-size'])

    def queue_import(self, src_vol, volid, vol):
        path = self.file_for(volid)
        vol['_qemu_file'] = path
        self.pending.append(('convert', src_vol['_qemu_file'], path, vol))

    def queue_create(self, volid, vol, size):
        path = self.file_for(volid)
        vol['_qemu_file'] = path
        self.pending.append(('create', None, path, vol, size))

    async def flush(self):
        """Runs the disk operations queued by synchronous fakepve code, inside its task."""
        while self.pending:
            job = self.pending.pop(0)
            os.makedirs(os.path.dirname(job[2]), exist_ok=True)
            started = time.time()
            if job[0] == 'convert':
                await run('qemu-img', 'convert', '-O', 'qcow2', job[1], job[2])
                if int(job[3].get('size') or 0):
                    await run('qemu-img', 'resize', job[2], str(int(job[3]['size'])))
            else:
                await run('qemu-img', 'create', '-f', 'qcow2', job[2], str(int(job[4])))
            self.stat('disk ' + job[0], time.time() - started)

    def free(self, vol):
        path = (vol or {}).get('_qemu_file')
        if path and os.path.exists(path):
            os.chmod(path, 0o644)
            os.unlink(path)

    async def resize(self, vol, size):
        await run('qemu-img', 'resize', vol['_qemu_file'], str(int(size)))

    def make_base(self, vol):
        """Template: the disk becomes a read-only base (linked clones write to overlays)."""
        os.chmod(vol['_qemu_file'], 0o444)

    async def clone_disk(self, src_vol, volid, vol, full):
        path = self.file_for(volid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        started = time.time()
        if full:
            await run('qemu-img', 'convert', '-O', 'qcow2', src_vol['_qemu_file'], path)
        else:
            await run('qemu-img', 'create', '-f', 'qcow2', '-b', src_vol['_qemu_file'], '-F', 'qcow2', path)
        vol['_qemu_file'] = path
        self.stat('clone ' + ('full' if full else 'linked'), time.time() - started)

    def disk_sizes(self, vol):
        """(actual bytes on disk, virtual bytes) of a volume, qemu-img's view."""
        # -U: a running guest's QEMU holds the image's write lock.
        info = json.loads(subprocess.run(['qemu-img', 'info', '-U', '--output=json', vol['_qemu_file']], check=True,
                                         capture_output=True).stdout)
        return int(info.get('actual-size') or 0), int(info['virtual-size'])

    # ------------------------------------------------------------ processes

    def stat(self, what, secs):
        self.stats.append({'what': what, 'secs': round(secs, 3), 'time': time.time()})
        LOG.info('real guest: %s took %.1fs', what, secs)

    def running(self, vmid):
        g = self.guests.get(vmid)
        return g is not None and g.proc is not None and g.proc.returncode is None

    async def start_vm(self, vm, pve):
        """Starts QEMU for a VM whose boot disk is a real file."""
        vmid = vm.vmid
        directory = os.path.join(self.dir, 'vm-{0}'.format(vmid))
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        g = Guest(vmid, directory)
        cfg = vm.config
        argv = ['qemu-system-x86_64', '-name', 'vm{0}'.format(vmid), '-nodefaults', '-no-user-config',
                '-display', 'none', '-machine', 'pc', '-accel', self.accel + (',thread=multi' if self.accel == 'tcg' else ''),
                '-cpu', 'host' if self.accel == 'kvm' else 'qemu64,-svm',
                '-smp', str(max(1, min(2, int(cfg.get('cores') or 1) * int(cfg.get('sockets') or 1)))),
                '-m', str(int(cfg.get('memory') or 512)),
                '-chardev', 'file,id=serial0,path={0}'.format(g.path('console.log')), '-serial', 'chardev:serial0',
                '-qmp', 'unix:{0},server=on,wait=off'.format(g.path('qmp.sock'))]
        if str(cfg.get('agent', '')).split(',')[0] in ('1', 'enabled=1'):
            argv += ['-chardev', 'socket,id=qga0,path={0},server=on,wait=off'.format(g.path('qga.sock')),
                     '-device', 'virtio-serial,id=qga-serial', '-device',
                     'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0']
        argv += ['-device', 'virtio-scsi-pci,id=scsihw0']
        order = [k for k in str(cfg.get('boot', '')).replace('order=', '').split(';') if k]
        bootindex = {k: 100 + i for i, k in enumerate(order)}
        ide_unit = 0
        for key, volume, props in drives_of(cfg):
            if is_cdrom(volume, props):
                if volume.endswith('-cloudinit') or 'cloudinit' in volume:
                    iso = await self.cloudinit_iso(g, vm)
                    argv += ['-drive', 'file={0},if=none,id=drive-{1},media=cdrom,format=raw,readonly=on'.format(iso, key),
                             '-device', 'ide-cd,bus=ide.{0},unit={1},drive=drive-{2}'.format(ide_unit // 2, ide_unit % 2, key)]
                    ide_unit += 1
                continue
            vol = pve.volume_dict(volume)
            if not self.is_real(vol):
                continue
            path = vol['_qemu_file']
            boot = ',bootindex={0}'.format(bootindex[key]) if key in bootindex else ''
            argv += ['-drive', 'file={0},if=none,id=drive-{1},format=qcow2,cache=unsafe,discard=unmap'.format(path, key)]
            if key.startswith('virtio'):
                argv += ['-device', 'virtio-blk-pci,drive=drive-{0}{1}'.format(key, boot)]
            elif key.startswith('scsi'):
                argv += ['-device', 'scsi-hd,bus=scsihw0.0,drive=drive-{0}{1}'.format(key, boot)]
            else:
                argv += ['-device', 'ide-hd,bus=ide.{0},unit={1},drive=drive-{2}{3}'.format(
                    ide_unit // 2, ide_unit % 2, key, boot)]
                ide_unit += 1
        if 'net0' in cfg:
            netdev = 'user,id=net0,restrict=on,net=10.0.2.0/24,host={0},dns={1}'.format(GUEST_GW, GUEST_DNS)
            ip = loopback_ip(cfg.get('ipconfig0')) or self.fallback_ip(vmid)
            if self.h.ssh_port:
                netdev += ',hostfwd=tcp:{0}:{1}-:22'.format(ip, self.h.ssh_port)
            netdev += ',guestfwd=tcp:{0}:{1}-cmd:{2} {3} {4} {5}'.format(
                REPO_ADDR[0], REPO_ADDR[1], sys.executable, os.path.join(self.dir, 'relay.py'), self.h.host,
                self.repo_port)
            argv += ['-netdev', netdev, '-device', 'virtio-net-pci,netdev=net0,mac={0}'.format(
                mac_of(cfg.get('net0')) or 'bc:24:11:00:00:{0:02x}'.format(vmid % 256))]
        with open(g.path('cmdline'), 'w') as f:
            f.write(' '.join(argv) + '\n')
        log = open(g.path('qemu.log'), 'wb')
        g.proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                                                      stderr=log, preexec_fn=die_with_parent)
        log.close()
        # QEMU exits at once on a bad command line or a port already taken.
        try:
            await asyncio.wait_for(asyncio.shield(g.proc.wait()), 0.5)
        except asyncio.TimeoutError:
            pass
        if g.proc.returncode is not None:
            with open(g.path('qemu.log'), 'rb') as f:
                raise TaskError('start failed: QEMU exited with code {0}: {1}'.format(
                    g.proc.returncode, f.read().decode(errors='replace').strip()[-500:]))
        self.guests[vmid] = g
        boot = {'vmid': vmid, 'name': cfg.get('name'), 'started': time.time(), 'stopped': None, 'kernel': None,
                'exitcode': None}
        self.boots.append(boot)

        async def watch():
            await g.proc.wait()
            boot['stopped'] = time.time()
            boot['exitcode'] = g.proc.returncode
            boot['kernel'] = self.booted_kernel(g)
            if self.guests.get(vmid) is g:
                del self.guests[vmid]
                LOG.info('VM %s: QEMU exited (%s) after %.0fs', vmid, g.proc.returncode, time.time() - g.started)
                vm.status = vm.qmpstatus = 'stopped'
                vm.started_at = None
        g.watcher = asyncio.ensure_future(watch())

    @staticmethod
    def booted_kernel(g):
        """The kernel release of the boot, from its banner on the serial console."""
        try:
            with open(g.path('console.log'), 'rb') as f:
                found = re.search(rb'Linux version (\S+)', f.read(1 << 20))
        except OSError:
            return None
        return found.group(1).decode() if found else None

    async def cloudinit_iso(self, g, vm):
        user_data, network_config, meta_data = nocloud(vm.config, vm.vmid)
        d = g.path('cidata')
        os.makedirs(d, exist_ok=True)
        for name, text in (('user-data', user_data), ('network-config', network_config), ('meta-data', meta_data)):
            with open(os.path.join(d, name), 'w') as f:
                f.write(text)
        iso = g.path('cloudinit.iso')
        await run('xorriso', '-as', 'mkisofs', '-quiet', '-o', iso, '-V', 'cidata', '-J', '-R', d)
        return iso

    def kill(self, g):
        if g.proc is not None and g.proc.returncode is None:
            try:
                g.proc.kill()
            except ProcessLookupError:
                pass

    async def stop_vm(self, vm):
        g = self.guests.get(vm.vmid)
        if g is None:
            return
        self.kill(g)
        await g.proc.wait()
        if g.watcher:
            await g.watcher

    async def qmp(self, g, command, arguments=None):
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(g.path('qmp.sock')), 5)
        try:
            await reader.readline()  # greeting
            writer.write(json.dumps({'execute': 'qmp_capabilities'}).encode() + b'\n')
            await self._qmp_answer(reader)
            msg = {'execute': command}
            if arguments:
                msg['arguments'] = arguments
            writer.write(json.dumps(msg).encode() + b'\n')
            return await self._qmp_answer(reader)
        finally:
            writer.close()

    async def _qmp_answer(self, reader):
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            if not line:
                raise TaskError('QMP connection closed')
            msg = json.loads(line)
            if 'return' in msg or 'error' in msg:
                return msg

    async def powerdown(self, vm, timeout, force):
        """PVE's shutdown task: ACPI power button, wait up to `timeout`, then kill or fail."""
        g = self.guests.get(vm.vmid)
        if g is None:
            vm.status = vm.qmpstatus = 'stopped'
            return None
        started = time.time()
        await self.qmp(g, 'system_powerdown')
        try:
            await asyncio.wait_for(asyncio.shield(g.proc.wait()), timeout)
            if g.watcher:
                await g.watcher
            self.stat('shutdown (ACPI)', time.time() - started)
            return None
        except asyncio.TimeoutError:
            if force:
                await self.stop_vm(vm)
                vm.status = vm.qmpstatus = 'stopped'
                return 'VM still running - terminating now with SIGTERM'
            raise TaskError('VM quit/powerdown failed - got timeout')

    # ------------------------------------------------------------ the guest agent

    async def _qga_connect(self, g):
        if g.qga_writer is not None:
            return
        g.qga_reader, g.qga_writer = await asyncio.wait_for(asyncio.open_unix_connection(g.path('qga.sock')), 2)

    def _qga_drop(self, g):
        if g.qga_writer is not None:
            g.qga_writer.close()
        g.qga_reader = g.qga_writer = None

    async def _qga_read(self, g, want_id=None):
        while True:
            line = await g.qga_reader.readline()
            if not line:
                raise QgaError('got timeout')
            line = line.strip(b'\xff \r\n')
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if want_id is not None:
                if msg.get('return') == want_id:
                    return msg
                continue
            return msg

    async def qga(self, g, command, arguments=None, timeout=COMMAND_TIMEOUT, answer=True):
        """One QGA command, after guest-sync-delimited (stale answers of an earlier, timed-out
        command are skipped); QGA errors raise QgaError."""
        async with g.qga_lock:
            try:
                await self._qga_connect(g)
                sync_id = int.from_bytes(os.urandom(4), 'big') & 0x7fffffff
                g.qga_writer.write(b'\xff' + json.dumps({'execute': 'guest-sync-delimited',
                                                         'arguments': {'id': sync_id}}).encode() + b'\n')
                await asyncio.wait_for(self._qga_read(g, sync_id), min(timeout, PING_TIMEOUT))
                msg = {'execute': command}
                if arguments:
                    msg['arguments'] = arguments
                g.qga_writer.write(json.dumps(msg).encode() + b'\n')
                if not answer:
                    return None
                reply = await asyncio.wait_for(self._qga_read(g), timeout)
            except (asyncio.TimeoutError, OSError, QgaError):
                self._qga_drop(g)
                raise QgaError('got timeout')
            if 'error' in reply:
                raise QgaError(reply['error'].get('desc', ''), reply['error'].get('class', 'GenericError'))
            return reply.get('return')

    async def agent_call(self, vm, command, values):
        """An agent endpoint, as PVE's API2::Qemu::Agent answers it."""
        vmid = vm.vmid
        cfg = vm.config
        if not str(cfg.get('agent', '')).split(',')[0] in ('1', 'enabled=1'):
            raise PveError(500, 'No QEMU guest agent configured')
        g = self.guests.get(vmid)
        if vm.status != 'running' or g is None:
            raise PveError(500, 'VM {0} is not running'.format(vmid))
        # qga_check_running: a guest-ping first, "not running" when it does not answer.
        try:
            await self.qga(g, 'guest-ping', timeout=PING_TIMEOUT)
        except QgaError:
            raise PveError(500, 'QEMU guest agent is not running')

        def fail(e):
            return PveError(500, "VM {0} qmp command 'guest-{1}' failed - {2}".format(vmid, command, e.desc))
        try:
            if command == 'exec':
                argv = list(values['command'])
                args = {'path': argv[0], 'arg': argv[1:], 'capture-output': True}
                if values.get('input-data') is not None:
                    args['input-data'] = base64.b64encode(str(values['input-data']).encode()).decode()
                return await self.qga(g, 'guest-exec', args)
            if command == 'exec-status':
                res = await self.qga(g, 'guest-exec-status', {'pid': int(values['pid'])})
                for key in ('out-data', 'err-data'):
                    if key in res:
                        res[key] = base64.b64decode(res[key]).decode('utf-8', errors='replace')
                for key in ('exited', 'out-truncated', 'err-truncated'):
                    if isinstance(res.get(key), bool):
                        res[key] = int(res[key])  # PVE's JSON has booleans as 1/0
                return res
            if command == 'shutdown':
                await self.qga(g, 'guest-shutdown', answer=False)
                return {'result': None}
            if command == 'file-read':
                handle = await self.qga(g, 'guest-file-open', {'path': values['file'], 'mode': 'r'})
                try:
                    chunk = await self.qga(g, 'guest-file-read', {'handle': handle, 'count': 16 * 1024 * 1024})
                finally:
                    await self.qga(g, 'guest-file-close', {'handle': handle})
                data = base64.b64decode(chunk.get('buf-b64', ''))
                return {'content': data.decode('utf-8', errors='replace'), 'truncated': not chunk.get('eof', True),
                        'bytes-read': len(data)}
            if command == 'network-get-interfaces':
                res = await self.qga(g, 'guest-network-get-interfaces')
                return {'result': self.nat_interfaces(vm, res)}
            args = dict((k, v) for k, v in values.items() if k not in ('node', 'vmid'))
            return {'result': await self.qga(g, 'guest-' + command, args or None)}
        except QgaError as e:
            raise fail(e)

    def nat_interfaces(self, vm, interfaces):
        """The guest's 10.0.2.15 is the VM's loopback address outside (module docstring)."""
        outside = loopback_ip(vm.config.get('ipconfig0')) or self.fallback_ip(vm.vmid)
        for iface in interfaces or []:
            for addr in iface.get('ip-addresses') or []:
                if addr.get('ip-address') == GUEST_IP:
                    addr['ip-address'] = outside
                    addr['prefix'] = 8
        return interfaces


def real_guest_pve(base):
    """The harness's GuestPve class with the real-guest overrides: what PVE does to files and
    processes happens here; everything else (API, schema, tasks, locks) stays fakepve's."""
    from fakepve import agent as guest_agent
    from fakepve.qemu import NEW_DISK, volume_ref

    class RealGuestPve(base):
        @property
        def backend(self):
            return self.h.backend

        def real_vm(self, vm):
            vols = [self.volume_dict(v) for _k, v, _p in drives_of(vm.config, skip_cdrom=True)]
            return any(self.backend.is_real(v) for v in vols)

        def _qm_new_drive(self, vmid, key, value, default):
            volume, props = split_drive(value)
            src = props.get('import-from')
            src_vol = None
            if src is not None:
                ssid, sname = volume_ref(src)
                src_vol = self._volumes(ssid).get(sname) if ssid else None
            value, volids = super()._qm_new_drive(vmid, key, value, default)
            if self.backend.is_real(src_vol):
                self.backend.queue_import(src_vol, volids[0], self.volume_dict(volids[0]))
            elif src is None and NEW_DISK.match(volume) and not is_cdrom(volume, props) and key != 'efidisk0':
                for volid in volids:
                    vol = self.volume_dict(volid)
                    if vol is not None and '-cloudinit' not in volid:
                        self.backend.queue_create(volid, vol, int(vol.get('size') or 0))
            return value, volids

        async def _apply_config(self, vm, user, p):
            try:
                result = await super()._apply_config(vm, user, p)
                await self.backend.flush()
                return result
            finally:
                self.backend.pending.clear()

        def _qm_free(self, volid):
            vol = self.volume_dict(volid)
            super()._qm_free(volid)
            self.backend.free(vol)

        async def _qm_clone(self, v, user):
            src = self.find(v['node'], v['vmid'])
            full = v.get('full')
            self.backend.clone_full[int(v['newid'])] = (not src.template) if full is None else \
                str(full) in ('1', 'true')
            return await super()._qm_clone(v, user)

        async def _powerdown(self, vm, p):
            if not self.backend.running(vm.vmid):
                return await super()._powerdown(vm, p)
            timeout = int(p.get('timeout') or self.shutdown_default_timeout)
            return await self.backend.powerdown(vm, timeout, str(p.get('forceStop', '0')) in ('1', 'true'))

        async def _agent_call(self, match, values):
            vm = self.find(values['node'], values['vmid'])
            if not self.real_vm(vm):
                return await super()._agent_call(match, values)
            command = match.template.rsplit('/', 1)[1]
            guest_agent.record(vm, command, values)
            return await self.backend.agent_call(vm, command, values)

        async def task(self, node, ttype, tid, user, body, vm=None, lock=True, log=()):
            inner = body
            src = self.vm(int(tid)) if ttype == 'qmclone' and str(tid).isdigit() else None

            async def wrapped():
                try:
                    note = await inner()
                    await self.backend.flush()
                finally:
                    self.backend.pending.clear()
                if vm is None:
                    if ttype == 'download':
                        self._real_download(str(tid))
                    return note
                if ttype == 'qmclone' and src is not None:
                    await self._real_clone(src, vm)
                if not self.real_vm(vm):
                    if ttype == 'qmstart' and self.guest_of(vm) is None:
                        LOG.warning('VM %s started with neither a real disk nor a modelled guest: nothing runs in it',
                                    vm.vmid)
                    return note
                if ttype == 'resize':
                    await self._sync_sizes(vm)
                elif ttype == 'qmtemplate':
                    for _k, volume, _p in drives_of(vm.config, skip_cdrom=True):
                        vol = self.volume_dict(volume)
                        if self.backend.is_real(vol):
                            self.backend.make_base(vol)
                elif ttype == 'qmstart' and vm.status == 'running':
                    try:
                        await self.backend.start_vm(vm, self)
                    except BaseException:
                        vm.status = vm.qmpstatus = 'stopped'
                        vm.started_at = None
                        raise
                elif ttype == 'qmstop':
                    await self.backend.stop_vm(vm)
                return note
            return await super().task(node, ttype, tid, user, wrapped, vm=vm, lock=lock, log=log)

        def _real_download(self, filename):
            """download-url of a registered real image: the file lands on the storage."""
            # The file is the registered image whose bytes it has (the name is the caller's).
            for sid, store in self.storages.items():
                for name, vol in store.get('volumes', {}).items():
                    if not name.endswith('/' + filename) or vol.get('_guest') is not None or vol.get('_qemu_file'):
                        continue
                    sha = (vol.get('_digests') or {}).get('sha256')
                    image = next((i for i in self.h.images.values() if i.get('file') and i.get('sha256') == sha), None)
                    if image is not None:
                        path = os.path.join(self.backend.dir, 'storage', sid, name)
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        shutil.copyfile(image['file'], path)
                        vol['_qemu_file'] = path
                        vol['virtual_size'] = image['virtual_size']

        async def _real_clone(self, src, new):
            full = self.backend.clone_full.pop(new.vmid, not src.template)
            for key, volume, _props in drives_of(src.config, skip_cdrom=True):
                vol = self.volume_dict(volume)
                if not self.backend.is_real(vol) or key not in new.config:
                    continue
                target_id = split_drive(new.config[key])[0]
                target = self.volume_dict(target_id)
                if target is not None:
                    await self.backend.clone_disk(vol, target_id, target, full)

        async def _sync_sizes(self, vm):
            """A disk whose size fakepve raised (resize) grows its file too."""
            for _k, volume, _p in drives_of(vm.config, skip_cdrom=True):
                vol = self.volume_dict(volume)
                if not self.backend.is_real(vol) or not os.path.exists(vol['_qemu_file']):
                    continue
                _actual, virtual = self.backend.disk_sizes(vol)
                if int(vol.get('size') or 0) > virtual:
                    await self.backend.resize(vol, int(vol['size']))

    return RealGuestPve

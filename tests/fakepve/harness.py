"""The fake Proxmox VE of sombrero's integration tests: fakepve plus a guest model and a control API.

    .venv/fakepve/bin/python tests/fakepve/harness.py --host 127.0.0.7 --dir /tmp/x [--port 0]
        [--control-port 0] [--time-scale 0]

Prints one JSON line on stdout (url, node, ca_cert_path, token_id, token_secret, limited_token_id,
limited_token_secret, control_url, ssh_port) once it listens, then serves until SIGTERM, SIGINT or
end of stdin (so a test process that dies never leaves it behind). Logs go to stderr, never a secret.

fakepve (PyPI, AGPL) is used unchanged through its Python API: `GuestPve` subclasses its `FakePve`
and overrides a few of its handler methods (create/config drives for `import-from`, the agent,
download-url, clone) and adds routes for `resize` and `vzdump`. The guest OS itself is guest.py.
The control API is plain HTTP+JSON on --control-port (same address). Rust callers use
tests/support/fakepve.rs, which wraps every call. A 400 {"error": ...} answers a bad call.

    GET  /health
    GET  /images/{name}            the bytes of a registered image (what download-url fetches)
    POST /images        {filename, contents?, agent?, virtual_size?, size?, present?, storage?, content?}
                        -> {filename, url, size, virtual_size, checksums: {sha256, ...}, volid?}
    POST /fail          {method, path, status?, message?, error?, html?, times?}   fakepve's fail()
    POST /fail/clear
    GET  /errors?method=&path=     catalogue errors [{name, status, message, in_task}]
    POST /time-scale    {scale}
    POST /lock          {vmid, lock}       lock=null unlocks
    POST /config-lock   {vmid, secs?} | {vmid, release: true}
    POST /network       {latency, jitter, node, drop_rate, hang_rate, hang_secs, seed}
    POST /node          {node, online}     an unknown node is added
    POST /quorum        {quorate}
    POST /guest         {vmid|null, cloud_init?, cloud_init_secs?, boot_secs?, failures?: [{pattern,
                         exitcode, stderr, stdout?, times?}]}   vmid null: defaults for every VM
    GET  /guest/{vmid}  {vmid, contents, running, active_services, agent_up}
    POST /vms           {vmid, name?, node?, status?, template?, config?, contents?|agent?, storage?,
                         disk_size?, with_disk?}   an existing VM or template with a modelled disk
    POST /vm-attr       {vmid, start_error?, start_secs?, stop_secs?, shutdown_secs?, acpi?, agent_hangs?}
    GET  /requests?since=SEQ       [{seq, method, path, params, status, token_id, time}], secrets as ***
    GET  /agent-commands?vmid=     [{vmid, via, command, input_data, exitcode, stdout, stderr, time}]
    POST /backups       {vmid, storage?, filename?, notes?, protected?, size?, ctime?} -> {volid}
    GET  /tasks         [{upid, node, type, id, user, status, exitstatus, starttime, endtime, ended_at}]
                        (ended_at: when the task's work ended, Unix seconds as a float)
    POST /reset         a fresh fake on the same address, tokens and CA
    POST /tokens        {privs, path?}  a new API token of a new user, both granted privs on path (default
                        '/') -> {token_id, token_secret}; kept across /reset
  With --real-guest CACHE_DIR (qemu_backend.py):
    POST /images        {filename, file}   a real image file (qcow2) instead of a modelled one
    GET  /real-guest    {accel, repo_requests, stats, boots: [{vmid, name, kernel, ...}], disks}
    GET  /real-guest/console/{vmid}        the serial console log of the VM's last boot
    POST /trap          {action: kill|drop|node-offline, after?: k, method?, path?: regex, writes_only?, pid?,
                         secs?, node?}   one shot, on the k-th (default 1st) API request matching (method,
                         path regex searched in the path, non-GET only): `kill` SIGKILLs pid right after the
                         answer is sent, `drop` executes the request and closes the connection unanswered,
                         `node-offline` answers, then takes the node offline for secs real seconds
    GET  /trap          {armed, seen, fired}; POST /trap {} disarms
    POST /task-secs     {type, secs}   tasks of this type (qmcreate, ...) first wait secs PVE seconds holding
                         their lock (a create: the VM shows lock=create and no tags or description meanwhile)

GET /access/permissions answers as PVE does (fakepve 0.5.0 lists raw ACL entries instead): with `path`,
{path: {privilege: 1}} of the privileges effective there (inherited from parents, pools); without, the
same for PVE's default top-level paths and every ACL path, leaving out paths with none.
"""

import argparse
import asyncio
import copy
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
import urllib.parse
import uuid

from aiohttp import ClientSession, ClientTimeout, web

from fakepve import FakePve, PveError, TaskError
from fakepve import agent as guest_agent
from fakepve.lxc import format_size
from fakepve.shapes import PRIVILEGES
from fakepve.qemu import DRIVE_KEY, NEW_DISK, drives_of, is_cdrom, join_drive, split_drive, volume_ref, with_mac
from fakepve.routing import die, param_error, split_list

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guest as guestos  # noqa: E402

LOG = logging.getLogger('fakepve-harness')
IMAGE_MAGIC = b'SOMBRERO-FAKEPVE-IMAGE v1\n'
# Request parameters never written to the request log (the log is read back by tests and printed on failure).
SECRET_PARAMS = re.compile(r'password|secret|ticket|otp|tfa|token', re.I)
TOKEN_ID = 'root@pam!sombrero'
LIMITED_USER = 'sombrero-ro@pve'
LIMITED_TOKEN_ID = LIMITED_USER + '!readonly'
# What the limited token may do: look, never change (PVE's PVEAuditor role, roughly).
LIMITED_PRIVS = ('VM.Audit', 'Datastore.Audit', 'Sys.Audit', 'Pool.Audit', 'SDN.Audit', 'VM.GuestAgent.Audit')
CLOUDINIT_KEYS = ('ciuser', 'cipassword', 'sshkeys', 'nameserver', 'searchdomain', 'cicustom', 'citype',
                  'ciupgrade') + tuple('ipconfig{0}'.format(n) for n in range(4))
GIB = 1024 ** 3


# ---------------------------------------------------------------- certificates

def make_ca_and_server_cert(directory, ip):
    """A test CA and a server certificate for `ip` (SAN: the IP, localhost), written as PEM files.
    rustls refuses a self-signed leaf used as its own trust anchor, hence the separate CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'sombrero fakepve test CA')])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)),
                                                        x509.DNSName('localhost')]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in ('ca.pem', 'server.pem', 'server.key')}
    with open(paths['ca.pem'], 'wb') as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths['server.pem'], 'wb') as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.open(paths['server.key'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 'wb') as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


# ---------------------------------------------------------------- helpers

def agent_enabled(config):
    """PVE's `agent` option: `1`, `enabled=1,...` or `1,fstrim_cloned_disks=1`."""
    first = str(config.get('agent', '0')).split(',')[0]
    return first.split('=')[-1] in ('1', 'true', 'yes', 'on')


def parse_ipconfig(value):
    """(ip, prefix) of an ipconfig value with ip=CIDR, else None (dhcp or none)."""
    props = dict(p.split('=', 1) for p in str(value or '').split(',') if '=' in p)
    ip = props.get('ip', '')
    if '/' not in ip:
        return None
    addr, prefix = ip.split('/', 1)
    return addr, int(prefix)


def size_bytes(text):
    found = re.match(r'^(\d+(?:\.\d+)?)([KMGT]?)$', str(text))
    if not found:
        return 0
    return int(float(found.group(1)) * {'': 1, 'K': 1024, 'M': 1024 ** 2, 'G': GIB, 'T': 1024 ** 4}[found.group(2)])


def image_bytes(contents, virtual_size):
    """The bytes served for an image: self-describing, so a download carries the guest model along."""
    meta = json.dumps({'contents': contents, 'virtual_size': virtual_size}, sort_keys=True).encode()
    return IMAGE_MAGIC + meta + b'\n'


def parse_image(data):
    if not data.startswith(IMAGE_MAGIC):
        return None
    try:
        return json.loads(data[len(IMAGE_MAGIC):].split(b'\n', 1)[0])
    except ValueError:
        return None


def wget_progress(size, steps):
    """Lines as `wget --progress=dot:mega` writes them to a PVE download task's log (each dot 64 KiB, 48 to a
    line), for a file of `size` bytes in `steps` lines of rising percentage ending at 100%."""
    out = []
    for i in range(1, steps + 1):
        done = size * i // steps
        offset_k = size * (i - 1) // steps // 1024
        dots = max(1, min(48, (done - size * (i - 1) // steps) // 65536))
        groups = ' '.join('.' * min(8, dots - g) for g in range(0, dots, 8))
        tail = '{0}% 10.0M 1s'.format(100 * i // steps) if i < steps else '100% 10.0M=0.5s'
        out.append('{0:>7}K {1:<54} {2:>4}'.format(offset_k, groups, tail))
    return out


def digests(data):
    return dict((name, hashlib.new(name, data).hexdigest()) for name in ('md5', 'sha1', 'sha224', 'sha256',
                                                                        'sha384', 'sha512'))


# ---------------------------------------------------------------- the fake PVE

class GuestPve(FakePve):
    """fakepve's FakePve with a guest behind each VM whose disk came from a modelled image."""

    def __init__(self, harness, **kwargs):
        super().__init__(**kwargs)
        self.h = harness

    def _build_app(self):
        app = super()._build_app()
        app.middlewares.insert(0, self.h.log_middleware)
        return app

    # ------------------------------------------------------------ access

    # PVE::RPCEnvironment::get_effective_permissions lists these besides every ACL path.
    DEFAULT_PERMISSION_PATHS = ('/', '/access', '/access/groups', '/nodes', '/pool', '/sdn', '/storage', '/vms')

    async def _permissions(self, v, user):
        """GET /access/permissions the way PVE answers (PVE::API2::AccessControl `permissions`)."""
        who = v.get('userid') or user
        if v.get('path') is not None:
            paths = [v['path']]
        else:
            paths = set(self.DEFAULT_PERMISSION_PATHS)
            for entries in (self.acl or {}).values():
                paths.update(path for path, _ in entries)
            paths = sorted(paths)
        out = {}
        for path in paths:
            held = [priv for priv in PRIVILEGES if self._has(who, path, priv)]
            if held or v.get('path') is not None:
                out[path] = dict.fromkeys(held, 1)
        return out

    # ------------------------------------------------------------ volumes

    def volume_dict(self, volid):
        sid, name = volume_ref(str(volid))
        if sid is None or sid not in self.storages:
            return None
        return self.storages[sid].get('volumes', {}).get(name)

    def boot_volume(self, vm, config=None):
        """The volume dict of the VM's boot disk (first disk of boot order, else the first disk)."""
        cfg = vm.config if config is None else config
        drives = [(k, v) for k, v, _ in drives_of(cfg, skip_cdrom=True)]
        order = str(cfg.get('boot', ''))
        if order.startswith('order='):
            wanted = order[len('order='):].split(';')
            drives.sort(key=lambda kv: wanted.index(kv[0]) if kv[0] in wanted else len(wanted))
        for _key, volume in drives:
            vol = self.volume_dict(volume)
            if vol is not None and vol.get('_guest') is not None:
                return vol
        return None

    def guest_of(self, vm):
        vol = self.boot_volume(vm)
        return vol['_guest'] if vol else None

    # ------------------------------------------------------------ import-from

    def _import_source(self, user, key, src, vmid):
        """PVE's checks of an import-from source (qemu-server $check_drive_param / $check_storage_access)."""
        sid, name = volume_ref(src)
        if sid is None:
            if user != 'root@pam':
                raise die('Only root can pass arbitrary filesystem paths.')
            raise die('fakepve harness: import-from an absolute path is not modelled ({0})'.format(src))
        store = self._store(sid)
        vtype, owner, _fmt = self._parse_volname(store, name)
        if vtype not in ('images', 'import'):
            raise param_error(**{key: "{0} has wrong type '{1}' - needs to be 'images' or 'import'".format(src, vtype)})
        self._check_access(user, sid, vtype, owner, src)
        if vtype == 'images' and owner and owner != vmid:
            self.require(user, '/vms/{0}'.format(owner), 'VM.Clone')
        vol = self._volumes(sid).get(name)
        if vol is None:
            raise die("volume '{0}' does not exist".format(src))
        return vol

    def _qm_check_drive(self, user, vmid, pool, key, value, default):
        volume, props = split_drive(value)
        src = props.get('import-from')
        if src is None:
            return super()._qm_check_drive(user, vmid, pool, key, value, default)
        found = NEW_DISK.match(volume)
        if not found or float(found.group(2)) != 0 or is_cdrom(volume, props):
            raise param_error(**{key: "'import-from' requires special syntax - use <storage ID>:0,import-from=<source>"})
        sid = found.group(1) or default
        if not sid:
            raise die('no storage ID specified (and no default storage)')
        self._qm_image_store(sid, user)
        self._import_source(user, key, src, vmid)

    def _cloudinit_name(self, value, volids):
        """PVE names a cloud-init drive vm-<vmid>-cloudinit (fakepve: the next vm-<vmid>-disk-N)."""
        volid = volids[0]
        sid, name = volume_ref(volid)
        new_name = re.sub(r'vm-(\d+)-disk-\d+', r'vm-\1-cloudinit', name)
        volumes = self.storages[sid]['volumes']
        if new_name in volumes:
            raise die("volume '{0}:{1}' already exists".format(sid, new_name))
        volumes[new_name] = volumes.pop(name)
        new_volid = '{0}:{1}'.format(sid, new_name)
        return value.replace(volid, new_volid, 1), [new_volid]

    def _qm_new_drive(self, vmid, key, value, default):
        volume, props = split_drive(value)
        src = props.get('import-from')
        if src is None:
            value, volids = super()._qm_new_drive(vmid, key, value, default)
            if volume.endswith(':cloudinit') and volids:
                value, volids = self._cloudinit_name(value, volids)
            return value, volids
        props = dict(props)
        props.pop('import-from')
        sid = NEW_DISK.match(volume).group(1) or default
        ssid, name = volume_ref(src)
        vol = self._volumes(ssid).get(name)
        if vol is None:
            raise die("volume '{0}' does not exist".format(src))
        # The new disk has the image's virtual size (a qcow2 file is smaller than its disk).
        size = int(vol.get('virtual_size') or vol.get('size') or 0)
        volid, _fmt = self._qm_alloc(sid, vmid, props.pop('format', None), size)
        props['size'] = format_size(size)
        if vol.get('_guest') is not None:
            self.volume_dict(volid)['_guest'] = copy.deepcopy(vol['_guest'])
        return join_drive(volid, props), [volid]

    async def _apply_config(self, vm, user, p):
        """Config writes allocate new disks (`storage:N`) and import (`import-from`) as PVE does;
        fakepve alone stores such values verbatim. A `netN` written without a MAC gets one, as
        PVE's update does (parse_net makes a random one; fakepve does so on create and clone only):
        a guest's cloud-init matches its interface by that MAC."""
        p = dict(p)
        for key in p:
            if re.fullmatch(r'net\d+', key):
                p[key] = with_mac(p[key])
        made = []
        try:
            for key in sorted(p):
                if not DRIVE_KEY.match(key):
                    continue
                volume, props = split_drive(str(p[key]))
                if 'import-from' in props or (NEW_DISK.match(volume) and not is_cdrom(volume, props)):
                    self.require(user, '/vms/{0}'.format(vm.vmid), 'VM.Config.Disk')
                    self._check_lock(vm)
                    self._qm_check_drive(user, vm.vmid, vm.pool, key, p[key], None)
                    p[key], ids = self._qm_new_drive(vm.vmid, key, str(p[key]), None)
                    made.extend(ids)
            return await super()._apply_config(vm, user, p)
        except BaseException:
            for volid in made:
                self._qm_free(volid)
            raise

    # ------------------------------------------------------------ clone carries the contents

    async def task(self, node, ttype, tid, user, body, vm=None, lock=True, log=()):
        # When the task's work ended (Unix seconds, not rounded like `endtime`): the benchmarks
        # measure how late a client notices it.
        ended = {}
        timed_inner = body

        async def body():
            try:
                return await timed_inner()
            finally:
                ended['at'] = time.time()
                if 'record' in ended:
                    ended['record']['ended_at'] = ended['at']
        upid = await self._task(node, ttype, tid, user, body, vm=vm, lock=lock, log=log)
        ended['record'] = self.tasks[upid]
        if 'at' in ended:
            ended['record']['ended_at'] = ended['at']
        return upid

    async def _task(self, node, ttype, tid, user, body, vm=None, lock=True, log=()):
        secs = self.h.task_secs.get(ttype)
        if secs:
            slow_inner = body

            async def body():
                await self.pause(secs)
                return await slow_inner()
        if ttype == 'qmclone' and vm is not None:
            src = self.vm(int(tid))
            new = vm
            inner = body

            async def body():
                note = await inner()
                self._copy_guest(src, new)
                return note
        return await super().task(node, ttype, tid, user, body, vm=vm, lock=lock, log=log)

    def _copy_guest(self, src, new):
        """Every disk of the clone gets the contents of the source disk in the same slot, and its
        own cloud-init drive (fakepve would point the clone at the source's)."""
        if src is None:
            return
        for key, volume, props in drives_of(new.config):
            if volume.endswith('-cloudinit') and volume_ref(volume)[1].endswith('vm-{0}-cloudinit'.format(src.vmid)):
                sid = volume_ref(volume)[0]
                value, _ids = self._qm_new_drive(new.vmid, key, '{0}:cloudinit'.format(sid), None)
                new.config[key] = join_drive(split_drive(value)[0], dict(props))
        for key, volume, _props in drives_of(src.config, skip_cdrom=True):
            vol = self.volume_dict(volume)
            if vol is None or vol.get('_guest') is None or key not in new.config:
                continue
            target = self.volume_dict(split_drive(new.config[key])[0])
            if target is not None:
                target['_guest'] = copy.deepcopy(vol['_guest'])

    # ------------------------------------------------------------ resize and vzdump (generic in fakepve)

    def _routes_harness(self):
        return [('PUT', '/nodes/{node}/qemu/{vmid}/resize', self._qm_resize),
                ('POST', '/nodes/{node}/vzdump', self._vzdump)]

    async def _qm_resize(self, v, user):
        vm = self.find(v['node'], v['vmid'])
        self.require(user, '/vms/{0}'.format(vm.vmid), 'VM.Config.Disk')
        if not v.get('skiplock'):
            self._check_lock(vm)
        disk = v['disk']
        if disk not in vm.config:
            raise die("disk '{0}' does not exist".format(disk))
        volume, props = split_drive(vm.config[disk])
        if is_cdrom(volume, props):
            raise die("you can't resize a cdrom")
        vol = self.volume_dict(volume)
        current = int((vol or {}).get('size') or size_bytes(props.get('size', '0')))
        found = re.match(r'^(\+?)(\d+(?:\.\d+)?)([KMGT]?)$', str(v['size']))
        if not found:
            raise param_error(size="unable to parse size '{0}'".format(v['size']))
        amount = size_bytes(found.group(2) + found.group(3))
        new = current + amount if found.group(1) else amount

        async def body():
            # PVE (qemu-server 8.0.1 and later) refuses a shrink inside the worker: the task
            # fails, the request does not.
            if new < current:
                raise TaskError("shrinking disks is not supported")
            if vol is not None:
                vol['size'] = new
            vm.config[disk] = join_drive(volume, dict(props, size=format_size(new)))
            return None
        return await self.task(vm.node, 'resize', vm.vmid, user, body, vm=vm)

    async def _vzdump(self, v, user):
        """POST /nodes/{node}/vzdump: a real backup volume appears on the storage (fakepve's generic
        answer stores nothing), so retention tests can check it."""
        node = v['node']
        storage = v.get('storage') or 'local'
        store = self._store(storage)
        if 'backup' not in split_list(store.get('content')):
            raise die("can't use storage '{0}' for backups - wrong content type".format(storage))
        vmids = [int(x) for x in split_list(v.get('vmid'))]
        if not vmids:
            raise die('no VMs selected')  # `all` and pools are not modelled
        for vmid in vmids:
            self.require(user, '/vms/{0}'.format(vmid), 'VM.Backup')
        self.require(user, '/storage/' + storage, 'Datastore.AllocateSpace')
        ext = {'0': 'vma', 'gzip': 'vma.gz', '1': 'vma.lzo', 'lzo': 'vma.lzo', 'zstd': 'vma.zst'}.get(
            str(v.get('compress', '0')), 'vma')

        async def body():
            lines, failed = [], 0
            for vmid in vmids:
                vm = self.vm(vmid)
                if vm is None or vm.node != node:
                    lines.append('skip external VMs: {0}'.format(vmid))
                    continue
                if vm.lock:
                    lines.append('ERROR: Backup of VM {0} failed - VM is locked ({1})'.format(vmid, vm.lock))
                    failed += 1
                    continue
                self._qm_lock_backup(vm, 'backup')
                try:
                    await self.pause(5)
                finally:
                    self._qm_lock_backup(vm, None)
                stamp = time.strftime('%Y_%m_%d-%H_%M_%S', time.gmtime())
                volname = 'backup/vzdump-qemu-{0}-{1}.{2}'.format(vmid, stamp, ext)
                size = sum(int((self.volume_dict(vol) or {}).get('size') or 0) // 4
                           for _k, vol, _p in drives_of(vm.config, skip_cdrom=True)) or 1024 ** 2
                notes = str(v.get('notes-template') or '{{guestname}}').replace('{{guestname}}', vm.name) \
                    .replace('{{vmid}}', str(vmid)).replace('{{node}}', node).replace('{{cluster}}', self.cluster_name)
                entry = {'content': 'backup', 'format': ext.split('.', 1)[0] if '.' not in ext else ext,
                         'size': size, 'vmid': vmid, 'ctime': int(time.time()), 'notes': notes,
                         'protected': bool(int(v.get('protected') or 0))}
                self.storages[storage].setdefault('volumes', {})[volname] = entry
                lines.append('INFO: Finished Backup of VM {0}'.format(vmid))
                lines.append('INFO: archive file: {0}:{1}'.format(storage, volname))
            if failed:
                raise TaskError('job errors')
            return '\n'.join(lines)
        return await self.task(node, 'vzdump', vmids[0] if len(vmids) == 1 else '', user, body, lock=False,
                               log=['INFO: starting new backup job: vzdump {0}'.format(' '.join(map(str, vmids)))])

    def _qm_lock_backup(self, vm, lock):
        vm.lock = lock
        if lock:
            vm.config['lock'] = lock
        else:
            vm.config.pop('lock', None)

    # ------------------------------------------------------------ download-url, for real

    async def _download_url(self, request):
        """download-url fetches the URL (loopback only, to keep tests hermetic), verifies the checksum
        as PVE's download_file_from_url does, and stores the file with the guest model it describes.
        fakepve alone pretends a 1 MiB download and ignores the checksum."""
        from fakepve.server import USER, ok, params
        name = request.match_info['storage']
        store = self._active_store(name, request.match_info['node'])
        user = request[USER]
        self.require(user, '/storage/' + name, 'Datastore.AllocateTemplate')
        if not (self.allowed(user, '/', 'Sys.Audit') and self.allowed(user, '/', 'Sys.Modify')):
            self.require(user, '/nodes/' + request.match_info['node'], 'Sys.AccessNetwork')
        p = await params(request)
        p = self._verify(request, p)
        self._need_file_storage(store, "can't upload to storage type '{0}', not a file based storage!")
        content = p['content']
        if content not in split_list(store.get('content')):
            raise die("storage '{0}' is not configured for content-type '{1}'".format(name, content))
        filename = re.sub(r'[^a-zA-Z0-9_.-]', '_', os.path.basename(p['filename']))
        if content == 'import' and not re.match(r'^[a-zA-Z0-9\-.+=_]+\.(ova|qcow2|raw|vmdk)$', filename):
            raise param_error(filename='invalid filename or wrong extension')
        if content == 'iso' and not re.search(r'\.(?:iso|img)$', filename, re.I):
            raise param_error(filename='wrong file extension')
        algo, expect = p.get('checksum-algorithm'), p.get('checksum')
        url = p['url']
        volname = '{0}/{1}'.format(content, filename)
        path = '{0}/template/{1}/{2}'.format(self._base_path(name), {'iso': 'iso', 'vztmpl': 'cache'}.get(content,
                                                                                                        content), filename)

        # The task record, once known: lines go to it as they happen. At time scale 0 the task runs
        # before task() returns, so they wait in `pending` and end up in the final note instead.
        record, pending = {}, []

        def emit(line):
            if 'log' in record:
                record['log'].append(line)
            else:
                pending.append(line)

        async def body():
            existing = self._volumes(name).get(volname)
            if existing is not None:
                if not algo:
                    raise TaskError("refusing to override existing file '{0}'".format(path))
                got = (existing.get('_digests') or {}).get(algo, '')
                if got.lower() == str(expect).lower():
                    return 'OK, got correct file already, no need to download'
                raise TaskError("checksum mismatch: got '{0}' != expect '{1}', aborting".format(got, expect))
            host = urllib.parse.urlsplit(url).hostname or ''
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == 'localhost'
            if not loopback:
                raise TaskError('fakepve harness: refusing to download from a non-loopback URL ({0})'.format(host))
            try:
                async with ClientSession(timeout=ClientTimeout(total=30)) as session:
                    async with session.get(url, ssl=False) as rsp:
                        if rsp.status != 200:
                            raise TaskError('download failed: {0} {1}'.format(rsp.status, rsp.reason))
                        data = await rsp.read()
            except TaskError:
                raise
            except Exception as e:  # noqa: BLE001 - a connection error ends the task, as wget's would
                raise TaskError('download failed: {0}'.format(e)) from e
            emit('downloading {0} to {1}'.format(url, path))
            # wget's progress lines, spread over the download's 5 PVE seconds, as PVE's task log shows them.
            for line in wget_progress(len(data), 10):
                await self.pause(0.5)
                emit(line)
            sums = digests(data)
            if algo:
                got = sums[algo]
                if got.lower() != str(expect).lower():
                    raise TaskError("checksum mismatch: got '{0}' != expect '{1}'".format(got, expect))
            meta = parse_image(data)
            image = self.h.images.get(filename) or {}
            size = int(image.get('size') or len(data))
            self.store_file(name, filename, size, content)
            vol = self.storages[name]['volumes'][volname]
            vol['_digests'] = sums
            if meta is not None:
                vol['_guest'] = guestos.normalise(meta.get('contents'))
                vol['virtual_size'] = int(meta.get('virtual_size') or size)
            lines = pending[:]
            if algo:
                lines.append('calculating checksum...OK, checksum verified')
            lines.append('download of \'{0}\' to \'{1}\' finished'.format(url, path))
            return '\n'.join(lines)
        upid = await self.task(request.match_info['node'], 'download', filename, user, body)
        task = self.tasks[upid]
        if task['status'] == 'running':
            record['log'] = task['log']
            record['log'].extend(pending)
            pending.clear()
        return ok(upid)

    # ------------------------------------------------------------ the guest agent

    async def _agent_call(self, match, values):
        vm = self.find(values['node'], values['vmid'])
        contents = self.guest_of(vm)
        if contents is None:
            return await super()._agent_call(match, values)  # a VM without a modelled disk: fakepve's agent
        command = match.template.rsplit('/', 1)[1]
        if not agent_enabled(vm.config):
            raise PveError(500, 'No QEMU guest agent configured')
        if vm.status != 'running':
            raise PveError(500, 'VM {0} is not running'.format(vm.vmid))
        rt = self.h.runtime_of(vm, contents)
        if not self.h.agent_up(vm, contents, rt):
            raise PveError(500, 'QEMU guest agent is not running')
        if vm.agent_hangs:
            await self.pause(10)
            raise PveError(500, "VM {0} qmp command 'guest-ping' failed - got timeout".format(vm.vmid))
        guest_agent.record(vm, command, values)
        if vm.agent is None:
            vm.agent = {}
        if command == 'exec':
            argv = list(values['command'])
            rt.pid += 1
            try:
                code, out, err, secs = self.h.run(vm, contents, rt, argv, values.get('input-data'), via='agent')
            except guestos.ProgramNotFound as e:
                # qemu-ga's GenericError, as PVE's check_agent_error forwards it: a 500, no pid.
                raise PveError(500, 'Agent error: {0}'.format(e.desc))
            rt.execs[rt.pid] = {'done_at': time.time() + secs * self.time_scale, 'exitcode': code,
                                'out': out, 'err': err}
            return {'pid': rt.pid}
        if command == 'exec-status':
            pid = int(values['pid'])
            entry = rt.execs.get(pid)
            if entry is None:
                raise PveError(500, "Agent error: Invalid parameter 'pid'")
            if time.time() < entry['done_at']:
                return {'exited': 0}
            del rt.execs[pid]  # qemu-ga forgets a process once its exit status was collected
            data = {'exited': 1, 'exitcode': entry['exitcode']}
            if entry['out']:
                data['out-data'] = entry['out']
            if entry['err']:
                data['err-data'] = entry['err']
            return data
        if command == 'get-osinfo':
            return {'result': guestos.os_info(contents)}
        if command == 'get-host-name':
            return {'result': {'host-name': contents['hostname']}}
        if command == 'network-get-interfaces':
            return {'result': self.h.interfaces(vm)}
        if command == 'shutdown':
            self.h.poweroff(vm)
            return {'result': None}
        if command == 'file-read':
            shell = guestos.Shell(contents, rt, [], {}, lambda: None, 0)
            code, out, _err = shell.cmd_cat([values['file']])
            if code != 0:
                raise PveError(500, "Agent error: Failed to open file '{0}': No such file or directory".format(
                    values['file']))
            return {'content': out, 'truncated': False, 'bytes-read': len(out.encode())}
        return guest_agent.result(vm, command, values)


# ---------------------------------------------------------------- the harness

class Harness(object):
    def __init__(self, args):
        self.args = args
        self.host = args.host
        self.token_secret = str(uuid.uuid4())
        self.limited_secret = str(uuid.uuid4())
        self.extra_tokens = []  # (token_id, secret, path, privs) made by POST /tokens
        self.images = {}
        self.settings = {}
        self.runtime = {}
        self.requests = []
        self.request_seq = 0
        self.agent_log = []
        self.trap = None
        self.task_secs = {}
        self.ssh = None
        self.pve = None
        self.backend = None  # qemu_backend.QemuBackend with --real-guest
        self.control_runner = None
        self.paths = make_ca_and_server_cert(args.dir, self.host)

    # ------------------------------------------------------------ fake lifecycle

    def build_pve(self, port):
        cls = GuestPve
        if self.args.real_guest:
            import qemu_backend
            cls = qemu_backend.real_guest_pve(GuestPve)
        pve = cls(self, user='root@pam', password=secrets.token_urlsafe(16), host=self.host, port=port)
        pve.time_scale = float(self.args.time_scale)
        pve.storages['local']['content'] = ','.join(split_list(pve.storages['local']['content']) + ['import'])
        pve.apitokens[TOKEN_ID] = self.token_secret
        pve.apitokens[LIMITED_TOKEN_ID] = self.limited_secret
        pve.grant(LIMITED_USER, '/', *LIMITED_PRIVS)
        pve.grant(LIMITED_TOKEN_ID, '/', *LIMITED_PRIVS)
        for token_id, secret, path, privs in self.extra_tokens:
            self.add_token_to(pve, token_id, secret, path, privs)
        return pve

    @staticmethod
    def add_token_to(pve, token_id, secret, path, privs):
        # The user gets the same privileges as its token: fakepve has no privilege separation
        # (it unites token and user grants), and a privilege-separated token on PVE gets the
        # intersection; granting both the same makes the two agree.
        pve.apitokens[token_id] = secret
        pve.grant(token_id.split('!')[0], path, *privs)
        pve.grant(token_id, path, *privs)

    async def start(self):
        if self.args.real_guest:
            import qemu_backend
            self.backend = qemu_backend.QemuBackend(self, self.args.real_guest, self.args.dir)
            await self.backend.start()
        self.pve = self.build_pve(self.args.port)
        await self.pve.start(self.paths['server.pem'], self.paths['server.key'])
        self.control_runner = web.AppRunner(self.control_app(), access_log=None)
        await self.control_runner.setup()
        site = web.TCPSite(self.control_runner, self.host, self.args.control_port)
        await site.start()
        self.control_port = self.control_runner.addresses[0][1]
        try:
            import ssh_endpoint
            self.ssh = ssh_endpoint.SshEndpoints(self)
            self.ssh_port = await self.ssh.pick_port()
        except ImportError:
            self.ssh_port = None

    async def reset(self):
        port = self.pve.port
        await self.pve.stop()
        if self.backend:
            await self.backend.stop_all()
        if self.ssh:
            await self.ssh.close_all()
        self.images.clear()
        self.settings.clear()
        self.runtime.clear()
        self.requests.clear()
        self.agent_log.clear()
        self.trap = None
        self.task_secs.clear()
        self.pve = self.build_pve(port)
        await self.pve.start(self.paths['server.pem'], self.paths['server.key'])

    async def stop(self):
        if self.backend:
            await self.backend.stop()
        if self.ssh:
            await self.ssh.stop()
        if self.pve:
            await self.pve.stop()
        if self.control_runner:
            await self.control_runner.cleanup()

    def handoff(self):
        return {'url': self.pve.url, 'node': 'pve1', 'ca_cert_path': self.paths['ca.pem'],
                'token_id': TOKEN_ID, 'token_secret': self.token_secret,
                'limited_token_id': LIMITED_TOKEN_ID, 'limited_token_secret': self.limited_secret,
                'control_url': 'http://{0}:{1}'.format(self.host, self.control_port), 'ssh_port': self.ssh_port,
                'real_guest': self.backend.handoff() if self.backend else None}

    # ------------------------------------------------------------ request log

    @web.middleware
    async def log_middleware(self, request, handler):
        status = None
        trap = self.sprung_trap(request)
        try:
            response = await handler(request)
            status = response.status
            if trap is not None:
                await self.fire_trap(trap, request, response)
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            self.record_request(request, status)

    def sprung_trap(self, request):
        """The armed trap if this request is the one it waits for (counted on arrival)."""
        t = self.trap
        if t is None or t['fired']:
            return None
        if t['writes_only'] and request.method == 'GET':
            return None
        if t['method'] and request.method != t['method'].upper():
            return None
        if t['path'] and not t['path'].search(request.path):
            return None
        t['seen'] += 1
        if t['seen'] < t['after']:
            return None
        t['fired'] = True
        return t

    async def fire_trap(self, t, request, response):
        if t['action'] == 'drop':
            # Executed, but the client never hears of it: what a reset after the work looks like.
            request.transport.close()
            raise ConnectionResetError('fakepve harness: answer dropped')
        # Send the answer first, so "killed right after the k-th answer" holds exactly.
        await response.prepare(request)
        await response.write_eof()
        if t['action'] == 'kill':
            try:
                os.kill(int(t['pid']), signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif t['action'] == 'node-offline':
            self.pve.set_node_offline(t['node'], True)

            async def back():
                await asyncio.sleep(t['secs'])
                self.pve.set_node_offline(t['node'], False)
            asyncio.ensure_future(back())

    def record_request(self, request, status):
        params = {}
        for key, value in request.query.items():
            params.setdefault(key, value)
        try:
            body = request._read_bytes or b''  # read (and cached) by fakepve's middleware; never re-read here
        except AttributeError:
            body = b''
        if body:
            if (request.content_type or '').endswith('json'):
                try:
                    parsed = json.loads(body)
                    if isinstance(parsed, dict):
                        params.update(parsed)
                except ValueError:
                    pass
            else:
                for key, value in urllib.parse.parse_qsl(body.decode('utf-8', 'replace'), keep_blank_values=True):
                    if key in params and key not in request.query:
                        prev = params[key]
                        params[key] = (prev if isinstance(prev, list) else [prev]) + [value]
                    else:
                        params[key] = value
        for key in list(params):
            if SECRET_PARAMS.search(key):
                params[key] = '***'
        auth = request.headers.get('Authorization', '')
        user = auth[len('PVEAPIToken='):].split('=', 1)[0] if auth.startswith('PVEAPIToken=') else None
        self.request_seq += 1
        self.requests.append({'seq': self.request_seq, 'method': request.method, 'path': request.path,
                              'params': params, 'status': status, 'token_id': user, 'time': time.time()})
        if len(self.requests) > 20000:
            del self.requests[:1000]

    # ------------------------------------------------------------ guests

    def settings_for(self, vmid):
        merged = dict(self.settings.get('*', {}))
        own = self.settings.get(vmid, {})
        merged.update((k, v) for k, v in own.items() if k != 'failures')
        merged['failures'] = own.get('failures', []) + self.settings.get('*', {}).get('failures', [])
        return merged

    def pve_secs_since(self, started_at):
        if not self.pve.time_scale:
            return float('inf')
        return (time.time() - (started_at or time.time())) / self.pve.time_scale

    def instance_id(self, vm):
        blob = json.dumps([vm.vmid] + [vm.config.get(k) for k in CLOUDINIT_KEYS], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()

    def runtime_of(self, vm, contents):
        """The running guest of this boot of the VM; a new boot starts services and runs cloud-init."""
        rt = self.runtime.get(vm.vmid)
        if rt is None or rt.started_at != vm.started_at:
            rt = guestos.Runtime(vm.started_at)
            settings = self.settings_for(vm.vmid)
            guestos.boot(contents, rt, settings, self.instance_id(vm))
            if not agent_enabled(vm.config):
                rt.active.discard('qemu-guest-agent')  # no virtio port: udev never starts it
            if vm.config.get('name'):
                contents['hostname'] = vm.config['name']
            rt.cloud_init_done_at = (rt.cloud_init_done_at or 0) + float(settings.get('boot_secs', 15))
            self.runtime[vm.vmid] = rt
        return rt

    def agent_up(self, vm, contents, rt):
        booted = self.pve_secs_since(vm.started_at) >= float(self.settings_for(vm.vmid).get('boot_secs', 15))
        return booted and 'qemu-guest-agent' in contents['packages'] and 'qemu-guest-agent' in rt.active

    def run(self, vm, contents, rt, argv, input_data, via):
        settings = self.settings_for(vm.vmid)
        shell = guestos.Shell(contents, rt, settings['failures'], settings, lambda: self.poweroff(vm),
                              self.pve_secs_since(vm.started_at))
        code, out, err, secs = shell.run(argv, input_data)
        self.agent_log.append({'vmid': vm.vmid, 'via': via, 'command': list(argv), 'input_data': input_data,
                               'exitcode': code, 'stdout': out, 'stderr': err, 'time': time.time()})
        return code, out, err, secs

    def poweroff(self, vm):
        """The guest powers itself off, a moment later (after the exec has answered)."""
        async def later():
            await self.pve.pause(max(1, vm.shutdown_secs))
            vm.status = vm.qmpstatus = 'stopped'
            vm.started_at = None
            self.runtime.pop(vm.vmid, None)
        if self.pve.time_scale:
            asyncio.ensure_future(later())
        else:
            asyncio.get_event_loop().call_soon(lambda: asyncio.ensure_future(later()))

    def interfaces(self, vm):
        out = [{'name': 'lo', 'hardware-address': '00:00:00:00:00:00',
                'ip-addresses': [{'ip-address': '127.0.0.1', 'ip-address-type': 'ipv4', 'prefix': 8},
                                 {'ip-address': '::1', 'ip-address-type': 'ipv6', 'prefix': 128}]}]
        for n in range(4):
            net = vm.config.get('net{0}'.format(n))
            if net is None:
                continue
            mac = next((part.split('=', 1)[1] for part in str(net).split(',')
                        if '=' in part and re.match(r'^[0-9A-Fa-f:]{17}$', part.split('=', 1)[1])), 'bc:24:11:00:00:01')
            parsed = parse_ipconfig(vm.config.get('ipconfig{0}'.format(n)))
            if parsed is None:
                parsed = ('192.0.2.{0}'.format(vm.vmid % 250 + 2), 24)  # "dhcp": a documentation address
            out.append({'name': 'eth{0}'.format(n), 'hardware-address': mac.lower(),
                        'ip-addresses': [{'ip-address': parsed[0], 'ip-address-type': 'ipv4', 'prefix': parsed[1]}],
                        'statistics': {'rx-bytes': 0, 'rx-packets': 0, 'tx-bytes': 0, 'tx-packets': 0,
                                       'rx-errs': 0, 'rx-dropped': 0, 'tx-errs': 0, 'tx-dropped': 0}})
        return out

    # ------------------------------------------------------------ control API

    def control_app(self):
        app = web.Application(middlewares=[self.control_errors])
        r = app.router
        r.add_get('/health', self.c_health)
        r.add_get('/images/{name}', self.c_image_get)
        r.add_post('/images', self.c_image_add)
        r.add_post('/fail', self.c_fail)
        r.add_post('/fail/clear', self.c_fail_clear)
        r.add_get('/errors', self.c_errors)
        r.add_post('/time-scale', self.c_time_scale)
        r.add_post('/lock', self.c_lock)
        r.add_post('/config-lock', self.c_config_lock)
        r.add_post('/network', self.c_network)
        r.add_post('/node', self.c_node)
        r.add_post('/quorum', self.c_quorum)
        r.add_post('/guest', self.c_guest_set)
        r.add_get('/guest/{vmid}', self.c_guest_get)
        r.add_post('/vms', self.c_vm_add)
        r.add_post('/vm-attr', self.c_vm_attr)
        r.add_get('/requests', self.c_requests)
        r.add_get('/agent-commands', self.c_agent_commands)
        r.add_post('/backups', self.c_backup_add)
        r.add_get('/tasks', self.c_tasks)
        r.add_post('/reset', self.c_reset)
        if self.backend:
            self.backend.routes(r)
        r.add_post('/trap', self.c_trap_set)
        r.add_get('/trap', self.c_trap_get)
        r.add_post('/task-secs', self.c_task_secs)
        r.add_post('/tokens', self.c_token_add)
        return app

    @web.middleware
    async def control_errors(self, request, handler):
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (KeyError, ValueError, TypeError, re.error, PveError) as e:
            msg = getattr(e, 'message', None) or '{0}: {1}'.format(type(e).__name__, e)
            return web.json_response({'error': msg}, status=400)

    @staticmethod
    async def body(request):
        if not request.can_read_body:
            return {}
        return await request.json()

    def need_vm(self, vmid):
        vm = self.pve.vm(int(vmid))
        if vm is None:
            raise ValueError('no VM {0}'.format(vmid))
        return vm

    async def c_token_add(self, request):
        b = await self.body(request)
        privs = list(b['privs'])
        unknown = [p for p in privs if p not in PRIVILEGES]
        if unknown:
            raise ValueError('unknown privileges {0}'.format(unknown))
        n = len(self.extra_tokens) + 1
        token_id = 'sombrero-t{0}@pve!t{0}'.format(n)
        secret = str(uuid.uuid4())
        path = b.get('path') or '/'
        self.extra_tokens.append((token_id, secret, path, privs))
        self.add_token_to(self.pve, token_id, secret, path, privs)
        return web.json_response({'token_id': token_id, 'token_secret': secret})

    async def c_health(self, request):
        return web.json_response({'ok': True})

    async def c_image_get(self, request):
        image = self.images.get(request.match_info['name'])
        if image is None:
            raise web.HTTPNotFound()
        if image.get('file'):
            return web.FileResponse(image['file'])
        return web.Response(body=image['bytes'], content_type='application/octet-stream')

    async def c_image_add(self, request):
        b = await self.body(request)
        filename = b['filename']
        if b.get('file'):
            if not self.backend:
                raise ValueError('images from a file need the harness started with --real-guest')
            return web.json_response(await self.backend.add_image(filename, b['file']))
        contents = b.get('contents')
        contents = guestos.normalise(contents) if contents is not None else guestos.default_contents(
            agent=bool(b.get('agent', False)))
        virtual_size = int(b.get('virtual_size') or int(3.5 * GIB))
        data = image_bytes(contents, virtual_size)
        size = int(b.get('size') or 600 * 1024 ** 2)
        self.images[filename] = {'bytes': data, 'size': size}
        sums = digests(data)
        out = {'filename': filename, 'url': 'http://{0}:{1}/images/{2}'.format(self.host, self.control_port,
                                                                             urllib.parse.quote(filename)),
               'size': size, 'virtual_size': virtual_size, 'checksums': sums}
        if b.get('present'):
            storage = b.get('storage') or 'local'
            content = b.get('content') or 'import'
            self.pve.store_file(storage, filename, size, content)
            vol = self.pve.storages[storage]['volumes']['{0}/{1}'.format(content, filename)]
            vol.update(_guest=contents, virtual_size=virtual_size, _digests=sums)
            out['volid'] = '{0}:{1}/{2}'.format(storage, content, filename)
        return web.json_response(out)

    async def c_fail(self, request):
        b = await self.body(request)
        self.pve.fail(b['method'].upper(), b['path'], status=b.get('status'), message=b.get('message'),
                      html=bool(b.get('html', False)), error=b.get('error'), times=b.get('times'))
        return web.json_response({'ok': True})

    async def c_fail_clear(self, request):
        self.pve.failures.clear()
        return web.json_response({'ok': True})

    async def c_errors(self, request):
        q = request.query
        entries = self.pve.errors_for(q['method'].upper(), q['path'])
        return web.json_response([{k: e.get(k) for k in ('name', 'status', 'message', 'in_task')} for e in entries])

    async def c_time_scale(self, request):
        self.pve.time_scale = float((await self.body(request))['scale'])
        return web.json_response({'ok': True})

    async def c_lock(self, request):
        b = await self.body(request)
        if b.get('lock'):
            self.pve.snapshot_lock(int(b['vmid']), b['lock'])
        else:
            self.pve.unlock(int(b['vmid']))
        return web.json_response({'ok': True})

    async def c_config_lock(self, request):
        b = await self.body(request)
        if b.get('release'):
            self.pve.release_config_lock(int(b['vmid']))
        else:
            await self.pve.hold_config_lock(int(b['vmid']), b.get('secs'))
        return web.json_response({'ok': True})

    async def c_network(self, request):
        b = await self.body(request)
        self.pve.slow_network(float(b.get('latency', 0)), float(b.get('jitter', 0)), node=b.get('node'))
        self.pve.flaky_network(float(b.get('drop_rate', 0)), float(b.get('hang_rate', 0)),
                               float(b.get('hang_secs', 120)), b.get('seed'))
        # fakepve (0.5.0, pinned) seeds its generator only at start; a seed given here restarts it,
        # so the requests a share hits are the same in every run.
        if b.get('seed') is not None:
            self.pve._random.seed(b['seed'])
        return web.json_response({'ok': True})

    async def c_node(self, request):
        b = await self.body(request)
        if b['node'] not in self.pve.nodes:
            self.pve.add_node(b['node'], online=bool(b.get('online', True)))
        else:
            self.pve.set_node_offline(b['node'], not bool(b.get('online', True)))
        return web.json_response({'ok': True})

    async def c_quorum(self, request):
        if (await self.body(request)).get('quorate', True):
            self.pve.regain_quorum()
        else:
            self.pve.lose_quorum()
        return web.json_response({'ok': True})

    async def c_guest_set(self, request):
        b = await self.body(request)
        key = int(b['vmid']) if b.get('vmid') is not None else '*'
        current = self.settings.setdefault(key, {})
        for name in ('cloud_init', 'cloud_init_secs', 'boot_secs'):
            if name in b:
                current[name] = b[name]
        if 'failures' in b:
            rules = []
            for rule in b['failures']:
                re.compile(rule['pattern'])
                rules.append({'pattern': rule['pattern'], 'exitcode': int(rule.get('exitcode', 1)),
                              'stderr': rule.get('stderr', ''), 'stdout': rule.get('stdout', ''),
                              'times': rule.get('times')})
            current['failures'] = rules
        return web.json_response({'ok': True, 'settings': current})

    async def c_guest_get(self, request):
        vm = self.need_vm(request.match_info['vmid'])
        contents = self.pve.guest_of(vm)
        if contents is None:
            raise ValueError('VM {0} has no modelled guest (no disk from a registered image)'.format(vm.vmid))
        running = vm.status == 'running'
        rt = self.runtime_of(vm, contents) if running else None
        return web.json_response({'vmid': vm.vmid, 'contents': contents, 'running': running,
                                  'active_services': sorted(rt.active) if rt else [],
                                  'agent_up': bool(rt and agent_enabled(vm.config) and self.agent_up(vm, contents, rt))})

    async def c_vm_add(self, request):
        """A VM (or template) that already exists, with a disk on `storage` holding `contents`."""
        b = await self.body(request)
        vmid = int(b['vmid'])
        if self.pve.guest(vmid) is not None:
            raise ValueError('VM {0} exists'.format(vmid))
        storage = b.get('storage') or 'local-lvm'
        size = int(b.get('disk_size') or int(3.5 * GIB))
        config = dict(b.get('config') or {})
        vm = self.pve.add_vm(vmid, b.get('name') or 'vm{0}'.format(vmid), node=b.get('node') or 'pve1',
                             status=b.get('status') or 'stopped', config=config)
        if b.get('with_disk', True) and not any(DRIVE_KEY.match(k) for k in config):
            volid, _ = self.pve._qm_alloc(storage, vmid, None, size)
            vm.config['scsi0'] = join_drive(volid, {'size': format_size(size)})
            vm.config.setdefault('boot', 'order=scsi0')
            contents = b.get('contents')
            self.pve.volume_dict(volid)['_guest'] = guestos.normalise(contents) if contents is not None else \
                guestos.default_contents(agent=bool(b.get('agent', True)))
        if vm.status == 'running':
            vm.started_at = time.time()
        if b.get('template'):
            vm.template = True
            vm.config['template'] = 1
            for key, volume, props in drives_of(vm.config, skip_cdrom=True):
                vm.config[key] = join_drive(self.pve._qm_rename_volume(volume), props)
        return web.json_response({'vmid': vmid, 'config': vm.config})

    async def c_vm_attr(self, request):
        b = await self.body(request)
        vm = self.need_vm(b['vmid'])
        for name in ('start_error', 'start_secs', 'stop_secs', 'shutdown_secs', 'acpi', 'agent_hangs'):
            if name in b:
                setattr(vm, name, b[name])
        return web.json_response({'ok': True})

    async def c_requests(self, request):
        since = int(request.query.get('since', 0))
        return web.json_response([r for r in self.requests if r['seq'] > since])

    async def c_agent_commands(self, request):
        vmid = request.query.get('vmid')
        out = [e for e in self.agent_log if vmid is None or e['vmid'] == int(vmid)]
        return web.json_response(out)

    async def c_backup_add(self, request):
        b = await self.body(request)
        storage = b.get('storage') or 'local'
        vmid = int(b['vmid'])
        ctime = int(b.get('ctime') or time.time())
        filename = b.get('filename') or 'vzdump-qemu-{0}-{1}.vma.zst'.format(
            vmid, time.strftime('%Y_%m_%d-%H_%M_%S', time.gmtime(ctime)))
        volname = 'backup/' + filename
        self.pve.storages[storage].setdefault('volumes', {})[volname] = {
            'content': 'backup', 'format': 'vma.zst', 'size': int(b.get('size') or 1024 ** 2), 'vmid': vmid,
            'ctime': ctime, 'notes': b.get('notes'), 'protected': bool(b.get('protected', False))}
        return web.json_response({'volid': '{0}:{1}'.format(storage, volname)})

    async def c_tasks(self, request):
        keys = ('upid', 'node', 'type', 'id', 'user', 'status', 'exitstatus', 'starttime', 'endtime', 'ended_at')
        return web.json_response([{k: t.get(k) for k in keys} for t in self.pve.tasklog])

    async def c_reset(self, request):
        await self.reset()
        return web.json_response({'ok': True})

    async def c_trap_set(self, request):
        b = await self.body(request)
        if not b.get('action'):
            self.trap = None
            return web.json_response({'ok': True})
        if b['action'] not in ('kill', 'drop', 'node-offline'):
            raise ValueError('action must be kill, drop or node-offline')
        if b['action'] == 'kill' and not b.get('pid'):
            raise ValueError('kill needs a pid')
        self.trap = {'action': b['action'], 'after': int(b.get('after') or 1), 'method': b.get('method'),
                     'path': re.compile(b['path']) if b.get('path') else None,
                     'writes_only': bool(b.get('writes_only')), 'pid': b.get('pid'),
                     'secs': float(b.get('secs') or 0), 'node': b.get('node') or 'pve1', 'seen': 0, 'fired': False}
        return web.json_response({'ok': True})

    async def c_trap_get(self, request):
        t = self.trap
        return web.json_response({'armed': bool(t and not t['fired']), 'seen': t['seen'] if t else 0,
                                  'fired': bool(t and t['fired'])})

    async def c_task_secs(self, request):
        b = await self.body(request)
        self.task_secs[b['type']] = float(b.get('secs') or 0)
        return web.json_response({'ok': True})


# ---------------------------------------------------------------- main

def watch_stdin(loop, stop):
    """End the harness when stdin closes: the test process that spawned it is gone."""
    def read():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        loop.call_soon_threadsafe(stop.set)
    threading.Thread(target=read, daemon=True).start()


async def main(args):
    harness = Harness(args)
    await harness.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not args.no_stdin_watch:
        watch_stdin(loop, stop)
    sys.stdout.write(json.dumps(harness.handoff()) + '\n')
    sys.stdout.flush()
    LOG.info('listening on %s, control on %s', harness.pve.url, harness.handoff()['control_url'])
    await stop.wait()
    await harness.stop()


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--host', default='127.0.0.2', help='loopback address to listen on (API and control)')
    parser.add_argument('--port', type=int, default=0, help='API port (0: a free one)')
    parser.add_argument('--control-port', type=int, default=0, help='control API port (0: a free one)')
    parser.add_argument('--dir', required=True, help='where the CA and server certificate are written')
    parser.add_argument('--time-scale', type=float, default=0.0, help='real seconds per PVE second (0: instant)')
    parser.add_argument('--no-stdin-watch', action='store_true', help='do not exit when stdin closes')
    parser.add_argument('--real-guest', metavar='CACHE_DIR', help='VMs with real disks are QEMU processes '
                        '(qemu_backend.py); CACHE_DIR is what scripts/real-guest-image.sh printed')
    logging.basicConfig(level=os.environ.get('FAKEPVE_LOG', 'WARNING'), stream=sys.stderr,
                        format='fakepve-harness %(levelname)s %(message)s')
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        pass

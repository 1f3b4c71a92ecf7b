"""The simulated guest OS behind a fake Proxmox VM: what is on its disk and what runs in it.

fakepve (the fake PVE API) has no guest: agent `exec` runs nothing and new VMs have no agent. This
module is the guest model the harness adds on top. A disk carries `contents` (a JSON-friendly dict:
os-release, installed packages, services, cloud-init state, machine-id, SSH host keys, apt state)
that follow the disk through import-from, template conversion and clones. A running VM has a
`Runtime` (active services, boot time). `Shell` runs the small command set a build and a validation
use (apt-get, systemctl, cloud-init, dpkg-query, ...) against both, for the agent and for SSH alike.
"""

import copy
import json
import os
import re
import secrets
import shlex

UBUNTU_OS = {
    'id': 'ubuntu', 'name': 'Ubuntu', 'version_id': '24.04', 'version': '24.04.1 LTS (Noble Numbat)',
    'pretty_name': 'Ubuntu 24.04.1 LTS', 'version_codename': 'noble', 'kernel_release': '6.8.0-45-generic',
}

# A minimal Ubuntu 24.04 cloud image, cut down: enough names for drift checks to mean something.
UBUNTU_BASELINE = {
    'apt': '2.7.14build2', 'base-files': '13ubuntu10.1', 'bash': '5.2.21-2ubuntu4', 'ca-certificates': '20240203',
    'cloud-guest-utils': '0.33-1', 'cloud-init': '24.2-0ubuntu1~24.04.2', 'coreutils': '9.4-3ubuntu6',
    'cron': '3.0pl1-184ubuntu2', 'curl': '8.5.0-2ubuntu10.4', 'dbus': '1.14.10-4ubuntu4.1', 'dpkg': '1.22.6ubuntu6.1',
    'e2fsprogs': '1.47.0-2.4~exp1ubuntu4.1', 'gpg': '2.4.4-2ubuntu17', 'grub-pc': '2.12-1ubuntu7',
    'iproute2': '6.1.0-1ubuntu6', 'iputils-ping': '3:20240117-1build1', 'kmod': '31+20240202-2ubuntu7',
    'less': '590-2ubuntu2.1', 'libc6': '2.39-0ubuntu8.3', 'linux-image-6.8.0-41-generic': '6.8.0-41.41',
    'linux-image-6.8.0-45-generic': '6.8.0-45.45', 'linux-image-virtual': '6.8.0-45.45', 'logrotate': '3.21.0-2build1',
    'lsb-release': '12.0-2', 'nano': '7.2-2build1', 'netplan.io': '1.0.1-1ubuntu2~24.04.1',
    'openssh-client': '1:9.6p1-3ubuntu13.4', 'openssh-server': '1:9.6p1-3ubuntu13.4', 'python3': '3.12.3-0ubuntu2',
    'python3-yaml': '6.0.1-2build2', 'rsyslog': '8.2312.0-3ubuntu9', 'sudo': '1.9.15p5-3ubuntu5',
    'systemd': '255.4-1ubuntu8.4', 'systemd-sysv': '255.4-1ubuntu8.4', 'tzdata': '2024a-3ubuntu1.1',
    'udev': '255.4-1ubuntu8.4', 'ubuntu-minimal': '1.539', 'util-linux': '2.39.3-9ubuntu6.1',
    'vim-tiny': '2:9.1.0016-1ubuntu7.2',
}
# What `apt-get install` can find once `apt-get update` has run (besides what is installed).
UBUNTU_REPOSITORY = {
    'qemu-guest-agent': '1:8.2.2+ds-0ubuntu1.4', 'htop': '3.3.0-4build1', 'jq': '1.7.1-3build1',
    'docker.io': '24.0.7-0ubuntu4.1', 'nginx': '1.24.0-2ubuntu7.1', 'build-essential': '12.10ubuntu1',
}
# What `apt-get upgrade` brings once `apt-get update` has run.
UBUNTU_UPGRADES = {
    'openssh-client': '1:9.6p1-3ubuntu13.5', 'openssh-server': '1:9.6p1-3ubuntu13.5', 'libc6': '2.39-0ubuntu8.4',
    'systemd': '255.4-1ubuntu8.5', 'systemd-sysv': '255.4-1ubuntu8.5', 'udev': '255.4-1ubuntu8.5',
    'linux-image-virtual': '6.8.0-47.47',
}
# Upgrades that need a package not installed yet: a new kernel is a new package behind the
# metapackage, so plain `apt-get upgrade` keeps the metapackage back.
UBUNTU_UPGRADE_NEEDS = {'linux-image-virtual': {'linux-image-6.8.0-47-generic': '6.8.0-47.47'}}
# Services a package brings: name -> True (enabled right after install), False (disabled) or
# 'static' (no [Install] section: `is-enabled` says static, `enable` only warns). qemu-guest-agent
# is static on Debian 12 and Ubuntu: udev starts it at boot when the virtio port exists, so it is
# not active right after install, only after the next boot (measured on a real Debian 12 guest).
SERVICES_OF = {
    'openssh-server': {'ssh': True},
    'cloud-init': {'cloud-init-local': True, 'cloud-init': True, 'cloud-config': True, 'cloud-final': True},
    'qemu-guest-agent': {'qemu-guest-agent': 'static'},
    'cron': {'cron': True},
    'rsyslog': {'rsyslog': True},
    'systemd': {'systemd-journald': True, 'systemd-networkd': True, 'systemd-resolved': True},
    'nginx': {'nginx': True},
    'docker.io': {'docker': True},
}
# Unit aliases (Alias= in [Install]): `sshd` is ssh.service on Debian and Ubuntu.
ALIASES = {'sshd': 'ssh'}
# systemd's notice for `enable` of a unit without an [Install] section (systemd 252, Debian 12).
STATIC_ENABLE_NOTICE = (
    'The unit files have no installation config (WantedBy=, RequiredBy=, UpheldBy=,\n'
    'Also=, or Alias= settings in the [Install] section, and DefaultInstance= for\n'
    'template units). This means they are not meant to be enabled or disabled using systemctl.\n'
    ' \n'
    'Possible reasons for having these kinds of units are:\n'
    '\u2022 A unit may be statically enabled by being symlinked from another unit\'s\n'
    '  .wants/, .requires/, or .upholds/ directory.\n'
    '\u2022 A unit\'s purpose may be to act as a helper for some other unit which has\n'
    '  a requirement dependency on it.\n'
    '\u2022 A unit may be started when needed via activation (socket, path, timer,\n'
    '  D-Bus, udev, scripted systemctl call, ...).\n'
    '\u2022 In case of template units, the unit is meant to be enabled with some\n'
    '  instance name specified.\n')
# `systemctl is-enabled` of a unit that does not exist (systemd 252): stderr, exit 1.
UNIT_STATE_MISSING = 'Failed to get unit file state for {0}.service: No such file or directory\n'
# PVE seconds a command takes; exec-status answers `exited: 0` until then.
DURATIONS = {'apt-get update': 5, 'apt-get upgrade': 30, 'apt-get dist-upgrade': 30, 'apt-get full-upgrade': 30,
             'apt-get install': 10, 'apt-get autoremove': 3, 'apt-get remove': 3, 'apt-get purge': 3}


def _debian_12_profile():
    """The Debian 12 profile, read from what the real guest answered (tests/transcripts/debian-12/
    build.json, scripts/record-guest-transcripts.sh): the image's packages (its `dpkg-query` before
    anything ran), the upgrades and the NEW packages they need (`apt-get -s
    full-upgrade`), the recipe's packages and their closure (`apt-get -s install ...`), the
    os-release and kernel. The closure is split by name: jq's libraries go with jq, the rest with
    qemu-guest-agent (the recording simulates one install of all three)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'transcripts', 'debian-12', 'build.json')
    with open(path) as f:
        entries = json.load(f)['entries']

    def out(pred):
        return next((e['stdout'] for e in entries if pred(e)), '')
    baseline = {}
    for line in out(lambda e: e.get('phase') == 'image').splitlines():
        parts = line.split('\t')
        if len(parts) == 3 and parts[0][1:2] not in ('n', 'c'):
            baseline[parts[1]] = parts[2]
    inst = re.compile(r'^Inst (\S+) (?:\[(\S+)\] )?\((\S+) ')
    upgrades, new = {}, {}
    for line in out(lambda e: e['command'] == 'apt-get -s full-upgrade').splitlines():
        m = inst.match(line)
        if m:
            (upgrades if m.group(2) else new)[m.group(1)] = m.group(3)
    needs = {}
    if new:
        owner = 'linux-image-cloud-amd64' if 'linux-image-cloud-amd64' in upgrades else sorted(upgrades)[0]
        needs[owner] = new
    repository, closure = {}, []
    for line in out(lambda e: e['command'].startswith('apt-get -s install ')).splitlines():
        m = inst.match(line)
        if m:
            repository[m.group(1)] = m.group(3)
            closure.append(m.group(1))
    jq = [n for n in closure if n.startswith(('libjq', 'libonig'))]
    depends = {'jq': jq, 'qemu-guest-agent': [n for n in closure if n not in jq + ['jq', 'qemu-guest-agent', 'cloud-init']]}
    os_release = out(lambda e: e['command'] == 'cat /etc/os-release')
    fields = dict((k, v.strip('"')) for k, v in (ln.split('=', 1) for ln in os_release.splitlines() if '=' in ln))
    kernel = out(lambda e: e['command'] == 'uname -r').strip()
    os_info = {'id': fields.get('ID'), 'name': fields.get('NAME'), 'version_id': fields.get('VERSION_ID'),
               'version': fields.get('VERSION'), 'pretty_name': fields.get('PRETTY_NAME'),
               'version_codename': fields.get('VERSION_CODENAME'), 'kernel_release': kernel,
               'os_release': os_release}
    return {'os': os_info, 'packages': baseline, 'repository': repository, 'upgrades': upgrades,
            'upgrade_needs': needs, 'depends': depends, 'autoremovable': [], 'hostname': 'localhost',
            # Units with an init.d script (`systemctl enable` syncs them, recorded).
            'sysv': ('qemu-guest-agent', 'cloud-init'),
            # `apt-get install` without apt-utils (recorded).
            'apt_stderr': 'debconf: delaying package configuration, since apt-utils is not installed\n',
            'cloud_init_json': 'schema-1', 'kernel_version': '#1 SMP PREEMPT_DYNAMIC Debian 6.1.176-1 (2026-07-02)'}


PROFILES = {
    'ubuntu-24.04': {'os': UBUNTU_OS, 'packages': UBUNTU_BASELINE, 'repository': UBUNTU_REPOSITORY,
                     'upgrades': UBUNTU_UPGRADES, 'upgrade_needs': UBUNTU_UPGRADE_NEEDS, 'depends': {},
                     'autoremovable': ['linux-image-6.8.0-41-generic'], 'hostname': 'ubuntu',
                     'kernel_version': '#45-Ubuntu SMP PREEMPT_DYNAMIC'},
}
# Read lazily: only a test that asks for Debian needs the transcripts.
PROFILE_LOADERS = {'debian-12': _debian_12_profile}


def service_entry(enabled):
    """A service's state in the contents: enabled (a link), or static (no [Install]: started by its
    trigger, for qemu-guest-agent udev at boot when the virtio port exists)."""
    if enabled == 'static':
        return {'enabled': False, 'static': True}
    return {'enabled': bool(enabled)}


def profile_of(contents):
    """The distribution profile a contents dict names (`profile`, default Ubuntu 24.04)."""
    name = (contents or {}).get('profile') or 'ubuntu-24.04'
    if name not in PROFILES and name in PROFILE_LOADERS:
        PROFILES[name] = PROFILE_LOADERS[name]()
    if name not in PROFILES:
        raise ValueError('unknown guest profile {0!r}: use one of {1}'.format(
            name, ', '.join(sorted(set(PROFILES) | set(PROFILE_LOADERS)))))
    return name, PROFILES[name]


def default_contents(agent=False, profile='ubuntu-24.04'):
    """A fresh cloud image of `profile`: cloud-init never ran, no guest agent unless `agent`."""
    _, p = profile_of({'profile': profile})
    packages = dict(p['packages'])
    if agent:
        packages['qemu-guest-agent'] = p['repository']['qemu-guest-agent']
    return normalise({'profile': profile, 'packages': packages})


def normalise(contents):
    """Fill every key of a contents dict from its profile; a test may give only a few (e.g. just
    `packages`, or just `{"profile": "debian-12"}`)."""
    c = copy.deepcopy(contents or {})
    c['profile'], p = profile_of(c)
    c.setdefault('os', dict(p['os']))
    c.setdefault('packages', dict(p['packages']))
    if isinstance(c['packages'], list):
        c['packages'] = dict((n, p['packages'].get(n) or p['repository'].get(n) or '1.0') for n in c['packages'])
    for key in ('repository', 'upgrades', 'upgrade_needs', 'depends', 'autoremovable'):
        c.setdefault(key, copy.deepcopy(p[key]))
    c.setdefault('residual', {})
    services = c.setdefault('services', {})
    for pkg in c['packages']:
        for svc, enabled in SERVICES_OF.get(pkg, {}).items():
            services.setdefault(svc, service_entry(enabled))
    c.setdefault('cloud_init', {'status': 'not-run', 'instance_id': None, 'logs': False})
    c.setdefault('machine_id', '')
    c.setdefault('ssh_host_keys', False)
    c.setdefault('apt_lists', False)
    c.setdefault('apt_cache', False)
    c.setdefault('hostname', p['hostname'])
    return c


REDIRECT = '\x00redirect:'


def _redirect_token(m):
    """A redirection as one token for the command it belongs to: `1>2` (`>&2`), `2>1` (`2>&1`),
    `1>null`, `2>null`, `*>null` (`&>`); a file target counts as /dev/null (files are not modelled)."""
    fd, target = m.group(1) or '1', m.group(2)
    dest = target[1:] if target.startswith('&') else 'null'
    return ' ' + REDIRECT + ('*' if fd == '&' else fd) + '>' + dest + ' '


def apply_redirects(redirects, out, err):
    """Applies a simple command's redirections, left to right, to its (stdout, stderr)."""
    streams = {'1': out, '2': err}
    for r in redirects:
        fd, dest = r.split('>', 1)
        for f in ('1', '2') if fd == '*' else (fd,):
            text = streams.get(f, '')
            streams[f] = ''
            if dest in ('1', '2'):
                streams[dest] += text
    return streams['1'], streams['2']


class ProgramNotFound(Exception):
    """An exec of a program the guest does not have; `desc` is qemu-ga's GenericError text."""

    def __init__(self, program):
        Exception.__init__(self, program)
        # GLib's g_spawn message inside qemu-ga's QERR_QGA_COMMAND_FAILED.
        self.desc = ("Guest agent command failed, error was 'Failed to execute child process "
                     "\u201c{0}\u201d (No such file or directory)'".format(program))


class Runtime(object):
    """What only exists while a VM runs: the boot it belongs to, active services, exec results."""

    def __init__(self, started_at):
        self.started_at = started_at
        self.active = set()
        self.cloud_init_done_at = None
        self.execs = {}
        self.pid = 1000


class Shell(object):
    """Runs command lines against a guest's contents and runtime; returns (exitcode, stdout, stderr, secs).

    `failures` is a list of rules {'pattern': regex, 'exitcode': n, 'stderr': text, 'stdout': text,
    'times': n or None}: a simple command whose line matches fails that way and has no effect.
    `settings` holds 'cloud_init' ('done' | 'error' | 'degraded'); `on_poweroff` is called for
    shutdown/poweroff; `now_secs` is the PVE seconds since boot (for cloud-init still running).
    """

    def __init__(self, contents, runtime, failures, settings, on_poweroff, pve_secs_since_boot):
        self.c = contents
        self.rt = runtime
        self.failures = failures
        self.settings = settings
        self.on_poweroff = on_poweroff
        self.since_boot = pve_secs_since_boot
        self.secs = 0.0
        self.errexit = False
        self.shell = 'sh'  # whose words a `not found` uses: dash's (sh -c) or bash's (an SSH login)

    # ------------------------------------------------------------ parsing

    def run(self, argv, input_data=None):
        """An agent exec / SSH exec: argv (a shell with -c, a shell reading input-data, or a program).
        A program that does not exist raises ProgramNotFound: qemu-ga cannot spawn it (PVE answers
        500 "Agent error: ..."), there is no shell to say `not found` and exit 127."""
        argv = [str(a) for a in argv]
        prog = argv[0].rsplit('/', 1)[-1] if argv else ''
        if prog not in ('sh', 'bash', 'dash') and not self.known(prog, direct=True):
            raise ProgramNotFound(argv[0] if argv else '')
        if prog in ('sh', 'bash', 'dash'):
            self.shell = argv[0]  # dash names itself by argv[0]: `/bin/sh: 1: X: not found`
        if prog in ('sh', 'bash', 'dash'):
            flags = [a for a in argv[1:] if a.startswith('-')]
            rest = [a for a in argv[1:] if not a.startswith('-')]
            errexit = any('e' in f for f in flags)
            if any('c' in f for f in flags):
                return self.script(rest[0] if rest else '', errexit)
            return self.script(input_data or '', errexit)
        return self.simple(argv)

    def script(self, text, errexit=False):
        """A small subset of sh: `;`, `&&`, `||`, newlines, `set -e`, a `| filter` is not run (its
        input passes through), redirections are dropped, `exit n` ends the script."""
        text = re.sub(r'\s*(&|\d*)>>?\s*(&\d+|[^\s;&|]+)', _redirect_token, text)  # 2>&1, > /dev/null, &>> log
        text = re.sub(r'\s*<\s*[^\s;&|]+', '', text)
        lexer = shlex.shlex(text.replace('\n', ';'), posix=True, punctuation_chars=';&|')
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as e:
            return 2, '', 'sh: 1: Syntax error: {0}\n'.format(e), 0
        self.errexit = errexit
        code, out, err = 0, [], []
        op, cmd, in_filter = ';', [], False
        redirects = []
        for tok in tokens + [';']:
            if tok.startswith(REDIRECT):
                redirects.append(tok[len(REDIRECT):])
                continue
            if tok not in (';', '&&', '||', '|', '&'):
                if not in_filter:
                    cmd.append(tok)
                continue
            if cmd and not ((op == '&&' and code != 0) or (op == '||' and code == 0)):
                rc, o, e, _ = self.simple(cmd)
                o, e = apply_redirects(redirects, o, e)
                out.append(o)
                err.append(e)
                if isinstance(rc, tuple):  # `exit n`
                    return rc[1], ''.join(out), ''.join(err), self.secs
                code = rc
                if code != 0 and self.errexit and tok in (';', '&', '|'):
                    return code, ''.join(out), ''.join(err), self.secs
            cmd, redirects = [], []
            in_filter = tok == '|'
            if tok != '|':
                op = ';' if tok == '&' else tok
        return code, ''.join(out), ''.join(err), self.secs

    def simple(self, argv):
        """One simple command: strips sudo/env/VAR=... prefixes, applies failure rules, then runs it."""
        argv = list(argv)
        while argv:
            head = argv[0]
            if head in ('sudo', 'env', 'nohup', 'command', 'exec'):
                argv.pop(0)
                while argv and argv[0].startswith('-'):
                    argv.pop(0)
            elif head == 'timeout' and len(argv) > 1:
                argv = argv[2:]
            elif re.match(r'^[A-Za-z_][A-Za-z0-9_]*=', head):
                argv.pop(0)
            else:
                break
        if not argv:
            return 0, '', '', 0
        line = ' '.join(argv)
        for rule in self.failures:
            if re.search(rule['pattern'], line):
                if rule.get('times') is not None:
                    if rule['times'] <= 0:
                        continue  # used up
                    rule['times'] -= 1
                return int(rule.get('exitcode', 1)), rule.get('stdout', ''), rule.get('stderr', ''), 0
        prog = argv[0].rsplit('/', 1)[-1]
        handler = getattr(self, 'cmd_' + prog.replace('-', '_').replace('.', '_'), None)
        if prog in ('true', ':'):
            return 0, '', '', 0
        if prog == 'false':
            return 1, '', '', 0
        if prog == 'exit':
            return ('exit', int(argv[1]) if len(argv) > 1 else 0), '', '', 0
        if not self.known(prog):
            if self.shell.rsplit('/', 1)[-1] == 'bash':
                return 127, '', '{0}: line 1: {1}: command not found\n'.format(self.shell, argv[0]), 0
            return 127, '', '{0}: 1: {1}: not found\n'.format(self.shell, argv[0]), 0
        result = handler(argv[1:])
        args = iter(argv[1:])
        verb = ''
        for a in args:
            if a in ('-o', '--option', '-c', '-t'):
                next(args, None)
            elif not a.startswith('-'):
                verb = a
                break
        self.secs += DURATIONS.get(prog + ' ' + verb, 0)
        return result + (0,) if len(result) == 3 else result

    # Shell builtins: no program of that name for qemu-ga to spawn.
    BUILTINS = ('set', 'export', 'exit', 'cd')
    # Programs that exist only with their package.
    PROGRAM_PACKAGE = {'cloud-init': 'cloud-init'}

    def known(self, prog, direct=False):
        """Whether `prog` is a program on this guest (or, not `direct`ly spawned, a shell builtin)."""
        if direct and prog in self.BUILTINS + (':',):
            return False
        if prog in ('true', 'false', ':'):
            return True
        if getattr(self, 'cmd_' + prog.replace('-', '_').replace('.', '_'), None) is None:
            return False
        pkg = self.PROGRAM_PACKAGE.get(prog)
        return pkg is None or pkg in self.c['packages']

    # ------------------------------------------------------------ commands

    def cmd_echo(self, args):
        newline = '\n'
        if args and args[0] == '-n':
            args, newline = args[1:], ''
        return 0, ' '.join(args) + newline, ''

    def cmd_sleep(self, args):
        try:
            self.secs += float(args[0])
        except (IndexError, ValueError):
            return 1, '', 'sleep: missing operand\n'
        return 0, '', ''

    def cmd_set(self, args):
        if any(a.startswith('-') and 'e' in a for a in args) or args[:2] == ['-o', 'errexit']:
            self.errexit = True
        return 0, '', ''

    def cmd_export(self, args):
        return 0, '', ''

    cmd_sync = cmd_export

    def cmd_hostname(self, args):
        return 0, self.c['hostname'] + '\n', ''

    def cmd_uname(self, args):
        return 0, (self.c['os']['kernel_release'] if '-r' in args else 'Linux') + '\n', ''

    def cmd_id(self, args):
        return 0, ('0' if '-u' in args else 'uid=0(root) gid=0(root) groups=0(root)') + '\n', ''

    def cmd_cat(self, args):
        out = []
        for path in args:
            if path in ('/etc/os-release', '/usr/lib/os-release') and self.c['os'].get('os_release'):
                out.append(self.c['os']['os_release'])
            elif path in ('/etc/os-release', '/usr/lib/os-release'):
                o = self.c['os']
                out.append('PRETTY_NAME="{0}"\nNAME="{1}"\nVERSION_ID="{2}"\nVERSION="{3}"\nVERSION_CODENAME={4}\n'
                           'ID={5}\n'.format(o.get('pretty_name', ''), o.get('name', ''), o.get('version_id', ''),
                                            o.get('version', ''), o.get('version_codename', ''), o.get('id', '')))
            elif path == '/etc/machine-id':
                out.append(self.c['machine_id'] + ('\n' if self.c['machine_id'] else ''))
            elif path == '/etc/hostname':
                out.append(self.c['hostname'] + '\n')
            else:
                return 1, ''.join(out), 'cat: {0}: No such file or directory\n'.format(path)
        return 0, ''.join(out), ''

    def cmd_truncate(self, args):
        if args[-1:] == ['/etc/machine-id']:
            self.c['machine_id'] = ''
        return 0, '', ''

    def cmd_rm(self, args):
        force = any(a.startswith('-') and 'f' in a for a in args)
        for path in (a for a in args if not a.startswith('-')):
            if path.startswith('/etc/ssh/ssh_host_'):
                self.c['ssh_host_keys'] = False
            elif path == '/etc/machine-id':
                self.c['machine_id'] = ''
            elif path.startswith('/var/lib/apt/lists'):
                self.c['apt_lists'] = False
            elif path.startswith('/var/lib/cloud'):
                self.c['cloud_init']['status'] = 'not-run'
            elif not force and '*' not in path:
                return 1, '', "rm: cannot remove '{0}': No such file or directory\n".format(path)
        return 0, '', ''

    def cmd_shutdown(self, args):
        self.on_poweroff()
        return 0, '', ''

    cmd_poweroff = cmd_shutdown

    def cmd_systemctl(self, args):
        opts = [a for a in args if a.startswith('-')]
        words = [a for a in args if not a.startswith('-')]
        if not words:
            return 1, '', 'systemctl: missing verb\n'
        verb, named = words[0], [u[:-len('.service')] if u.endswith('.service') else u for u in words[1:]]
        units = [ALIASES.get(u, u) if ALIASES.get(u) in self.c['services'] else u for u in named]
        services = self.c['services']
        if verb in ('poweroff', 'halt'):
            return self.cmd_shutdown([])
        if verb == 'daemon-reload':
            return 0, '', ''
        if verb in ('is-active', 'is-enabled'):
            out, err, code = [], [], 0
            for name, unit in zip(named, units):
                if verb == 'is-active':
                    state = 'active' if unit in self.rt.active else 'inactive'
                    code = code or (0 if state == 'active' else 3)
                elif unit not in services:
                    err.append(UNIT_STATE_MISSING.format(name))
                    code = code or 1
                    continue
                else:
                    svc = services[unit]
                    state = 'alias' if name != unit else 'static' if svc.get('static') else \
                        'enabled' if svc.get('enabled') else 'disabled'
                    code = code or (0 if state in ('enabled', 'static', 'alias') else 1)
                out.append(state + '\n')
            return code, '' if '--quiet' in opts or '-q' in opts else ''.join(out), ''.join(err)
        for unit in units:
            if unit not in services:
                what = {'enable': 'Failed to enable unit', 'disable': 'Failed to disable unit',
                        'start': 'Failed to start {0}.service'.format(unit)}.get(verb, 'Failed to {0} unit'.format(verb))
                if verb in ('start', 'restart', 'stop'):
                    return 5, '', '{0}: Unit {1}.service not found.\n'.format(what, unit)
                return 1, '', '{0}: Unit file {1}.service does not exist.\n'.format(what, unit)
        notice = ''
        sysv = PROFILES[self.c['profile']].get('sysv', ())
        for unit in units:
            static = services[unit].get('static')
            if verb in ('enable', 'disable') and unit in sysv:
                # Debian 12: systemctl hands units with an init.d script to update-rc.d as well.
                notice += ('Synchronizing state of {0}.service with SysV service script with '
                           '/lib/systemd/systemd-sysv-install.\nExecuting: /lib/systemd/systemd-sysv-install '
                           '{1} {0}\n').format(unit, verb)
            elif verb in ('enable', 'disable') and static:
                notice = STATIC_ENABLE_NOTICE  # nothing to link; --now still starts/stops it
            elif verb == 'enable':
                services[unit]['enabled'] = True
            elif verb == 'disable':
                services[unit]['enabled'] = False
            if verb == 'enable' and '--now' in opts:
                self.rt.active.add(unit)
            elif verb == 'disable' and '--now' in opts:
                self.rt.active.discard(unit)
            elif verb in ('start', 'restart', 'reload-or-restart'):
                self.rt.active.add(unit)
            elif verb == 'stop':
                self.rt.active.discard(unit)
            elif verb not in ('enable', 'disable'):
                return 1, '', 'Unknown command verb {0}.\n'.format(verb)
        return 0, '', notice

    def cmd_apt_get(self, args):
        words, it = [], iter(args)
        for a in it:
            if a in ('-o', '--option', '-c', '--config-file', '-t', '--target-release'):
                next(it, None)  # the option's value
            elif not a.startswith('-'):
                words.append(a)
        yes = any(a in ('-y', '--yes', '--assume-yes', '-qy', '-yq') for a in args)
        if not words:
            return 100, '', 'E: Invalid operation\n'
        verb, names = words[0], words[1:]
        c = self.c
        if verb == 'update':
            c['apt_lists'] = True
            return 0, ('Hit:1 http://archive.ubuntu.com/ubuntu noble InRelease\n'
                       'Get:2 http://security.ubuntu.com/ubuntu noble-security InRelease [126 kB]\n'
                       'Reading package lists...\n'), ''
        simulate = any(a in ('-s', '--simulate', '--dry-run', '--just-print', '--no-act') for a in args)
        head = 'Reading package lists...\nBuilding dependency tree...\nReading state information...\n'
        if verb in ('upgrade', 'dist-upgrade', 'full-upgrade'):
            # `upgrade` keeps back an upgrade that needs a package not installed yet (a new kernel
            # behind its metapackage), with --with-new-pkgs too (apt 2.6 on the real Debian 12
            # guest, tests/transcripts/debian-12); dist-upgrade and full-upgrade install it.
            new_ok = verb != 'upgrade'
            todo = dict((p, v) for p, v in c['upgrades'].items() if p in c['packages']) if c['apt_lists'] else {}
            needs = c['upgrade_needs']
            held = sorted(p for p in todo if not new_ok and any(n not in c['packages'] for n in needs.get(p, {})))
            for p in held:
                del todo[p]
            new = {}
            for p in todo:
                new.update((n, v) for n, v in needs.get(p, {}).items() if n not in c['packages'])
            out = [head, 'Calculating upgrade...\n']
            if held:
                out.append('The following packages have been kept back:\n  {0}\n'.format(' '.join(held)))
            if new:
                out.append('The following NEW packages will be installed:\n  {0}\n'.format(' '.join(sorted(new))))
            if todo:
                out.append('The following packages will be upgraded:\n  {0}\n'.format(' '.join(sorted(todo))))
            out.append('{0} upgraded, {1} newly installed, 0 to remove and {2} not upgraded.\n'.format(
                len(todo), len(new), len(held)))
            if simulate:
                out += ['Inst {0} [{1}] ({2} Debian:12/stable [amd64])\n'.format(p, c['packages'][p], v)
                        for p, v in sorted(todo.items())]
                out += ['Inst {0} ({1} Debian:12/stable [amd64])\n'.format(p, v) for p, v in sorted(new.items())]
                return 0, ''.join(out), ''
            if (todo or new) and not yes:
                return 1, ''.join(out) + 'Do you want to continue? [Y/n] Abort.\n', ''
            c['packages'].update(todo)
            c['packages'].update(new)
            for p in list(todo) + list(new):
                c['upgrades'].pop(p, None)
                c['residual'].pop(p, None)
            out += ['Setting up {0} ({1}) ...\n'.format(p, v) for p, v in sorted(new.items())]
            out += ['Setting up {0} ({1}) ...\n'.format(p, v) for p, v in sorted(todo.items())]
            if todo or new:
                c['apt_cache'] = True
            return 0, ''.join(out), self.apt_stderr() if todo or new else ''
        if verb == 'install':
            for name in names:
                if name not in c['packages'] and (not c['apt_lists'] or name not in c['repository']):
                    return 100, head, 'E: Unable to locate package {0}\n'.format(name)
            # The names and what they depend on (the repository's closure), in order.
            wanted, queue = [], list(names)
            while queue:
                n = queue.pop(0)
                if n in wanted:
                    continue
                wanted.append(n)
                queue += [d for d in c['depends'].get(n, []) if d not in c['packages']]
            missing = [n for n in wanted if n not in c['packages'] and n in c['repository']]
            out = [head]
            out += ['{0} is already the newest version ({1}).\n'.format(n, c['packages'][n]) for n in names
                    if n in c['packages']]
            if missing:
                out.append('The following NEW packages will be installed:\n  {0}\n'.format(' '.join(sorted(missing))))
            summary = '0 upgraded, {0} newly installed, 0 to remove and 0 not upgraded.\n'.format(len(missing))
            if simulate:
                out.append(summary)
                out += ['Inst {0} ({1} Debian:12/stable [amd64])\n'.format(n, c['repository'][n]) for n in missing]
                return 0, ''.join(out), ''
            if missing and not yes:
                return 1, ''.join(out) + summary + 'Do you want to continue? [Y/n] Abort.\n', ''
            out.append(summary)
            for name in missing:
                c['packages'][name] = c['repository'][name]
                c['residual'].pop(name, None)
                for svc, enabled in SERVICES_OF.get(name, {}).items():
                    c['services'].setdefault(svc, service_entry(enabled))
                out.append('Setting up {0} ({1}) ...\n'.format(name, c['packages'][name]))
            if missing:
                c['apt_cache'] = True
            return 0, ''.join(out), self.apt_stderr() if missing else ''
        if verb in ('remove', 'purge', 'autoremove'):
            purge = verb == 'purge' or '--purge' in args
            targets = names if verb != 'autoremove' else [p for p in c['autoremovable'] if p in c['packages']]
            if verb == 'autoremove':
                c['autoremovable'] = []
            out = [head]
            if targets:
                out.append('The following packages will be REMOVED:\n  {0}\n'.format(
                    ' '.join(t + ('*' if purge else '') for t in targets)))
            out.append('0 upgraded, 0 newly installed, {0} to remove and 0 not upgraded.\n'.format(len(targets)))
            if targets and not yes:
                return 1, ''.join(out) + 'Do you want to continue? [Y/n] Abort.\n', ''
            for name in targets:
                version = c['packages'].pop(name, None)
                if purge:
                    c['residual'].pop(name, None)
                elif version is not None:
                    # dpkg keeps config files (and the postrm for a later purge): state `rc`.
                    c['residual'][name] = version
                for svc in SERVICES_OF.get(name, {}):
                    c['services'].pop(svc, None)
                    self.rt.active.discard(svc)
                out.append('Removing {0} ({1}) ...\n'.format(name, version))
            return 0, ''.join(out), ''
        if verb in ('clean', 'autoclean'):
            c['apt_cache'] = False
            return 0, '', ''
        return 100, '', 'E: Invalid operation {0}\n'.format(verb)

    cmd_apt = cmd_apt_get

    def apt_stderr(self):
        """What apt says on stderr when it configures packages (Debian 12 without apt-utils)."""
        if 'apt-utils' in self.c['packages']:
            return ''
        return PROFILES[self.c['profile']].get('apt_stderr', '')

    def cmd_dpkg_query(self, args):
        fmt = '${Package}\t${Version}\n'
        names = []
        it = iter(args)
        for a in it:
            if a in ('-f', '--showformat'):
                fmt = next(it, fmt)
            elif a.startswith(('-f=', '--showformat=')):
                fmt = a.split('=', 1)[1]
            elif not a.startswith('-'):
                names.append(a)
        fmt = fmt.replace('\\n', '\n').replace('\\t', '\t')
        pkgs, residual = self.c['packages'], self.c['residual']
        listed = dict(residual)
        listed.update(pkgs)
        chosen = sorted(listed) if not names else [n for n in names if n in listed]
        out = []
        for name in chosen:
            installed = name in pkgs
            out.append(fmt.replace('${binary:Package}', name).replace('${Package}', name)
                       .replace('${Version}', listed[name])
                       .replace('${Status}', 'install ok installed' if installed else 'deinstall ok config-files')
                       .replace('${db:Status-Abbrev}', 'ii ' if installed else 'rc ')
                       .replace('${db:Status-Status}', 'installed' if installed else 'config-files')
                       .replace('${Installed-Size}', '100'))
        err = ''.join('dpkg-query: no packages found matching {0}\n'.format(n) for n in names if n not in listed)
        return (1 if err else 0), ''.join(out), err

    def cmd_dpkg(self, args):
        if args[:1] == ['-l'] or args[:1] == ['--list']:
            pkgs = self.c['packages']
            listed = dict((n, ('rc', v)) for n, v in self.c['residual'].items())
            listed.update((n, ('ii', v)) for n, v in pkgs.items())
            lines = ['{0}  {1:<40} {2:<30} amd64 -\n'.format(listed[n][0], n, listed[n][1]) for n in sorted(listed)]
            return 0, ''.join(lines), ''
        if args[:1] == ['-s'] or args[:1] == ['--status']:
            return self.cmd_dpkg_query(['-W'] + args[1:])
        return 2, '', 'dpkg: error: need an action option\n'

    def cloud_init_json(self, status, shown):
        """`cloud-init status --format json`: cloud-init 22.4's keys (recorded on Debian 12), or
        24.x's for the Ubuntu profile (extended_status, recoverable_errors, per-stage details)."""
        detail = 'DataSourceNoCloud [seed=/dev/sr0][dsmode=net]'
        errors = ['script-user failure'] if status == 'error' else []
        v1 = {'boot_status_code': 'enabled-by-generator', 'datasource': 'nocloud', 'detail': detail,
              'errors': errors, 'last_update': 'Tue, 01 Dec 2026 00:00:00 +0000', 'status': shown}
        if PROFILES[self.c['profile']].get('cloud_init_json') == 'schema-1':
            return dict(v1, _schema_version='1', schemas={'1': dict(v1)})
        extended = 'degraded done' if status == 'degraded' else shown
        stage = {'errors': [], 'finished': 1.0, 'recoverable_errors': {}, 'start': 0.5}
        v1.update(extended_status=extended, recoverable_errors={}, stage=None, init=stage,
                  **{'init-local': stage, 'modules-config': stage, 'modules-final': stage})
        return dict(v1, _schema_version='1', schemas={'1': dict(v1)})

    def cmd_cloud_init(self, args):
        words = [a for a in args if not a.startswith('-')]
        verb = words[0] if words else ''
        ci = self.c['cloud_init']
        if verb == 'status':
            remaining = 0.0
            if self.rt.cloud_init_done_at is not None:
                remaining = max(0.0, self.rt.cloud_init_done_at - self.since_boot)
            wait = '--wait' in args or '-w' in args
            status = ci['status'] if remaining <= 0 or wait else 'running'
            if wait:
                self.secs += remaining
            shown = {'not-run': 'not started', 'degraded': 'done'}.get(status, status)
            code = {'error': 1, 'degraded': 2}.get(status, 0)
            if '--format' in args or any(a.startswith('--format=') for a in args):
                return code, json.dumps(self.cloud_init_json(status, shown), indent=2, sort_keys=True) + '\n', ''
            # While --wait waits, a dot every quarter second, then a newline (cloud-init 22.4,
            # recorded on Debian 12: `....\nstatus: done`).
            prefix = '.' * min(400, int(remaining / 0.25)) + '\n' if wait else ''
            lines = ['status: {0}'.format(shown)]
            if '--long' in args or '-l' in args:
                if status == 'degraded':
                    lines.append('extended_status: degraded done')
                lines += ['boot_status_code: enabled-by-generator',
                          'detail:', 'script-user failure' if status == 'error' else 'DataSourceNoCloud [seed=/dev/sr0][dsmode=net]']
            return code, prefix + '\n'.join(lines) + '\n', ''
        if verb == 'clean':
            ci['status'] = 'not-run'
            ci['instance_id'] = None
            if '--logs' in args or '-l' in args:
                ci['logs'] = False
            if '--machine-id' in args:
                self.c['machine_id'] = ''
            if '--seed' in args or '-s' in args:
                pass
            return 0, '', ''
        return 2, '', 'cloud-init: error: invalid choice: {0!r}\n'.format(verb)


def newest_kernel(packages):
    """The release of the newest installed kernel image (`linux-image-6.1.0-57-cloud-amd64` ->
    `6.1.0-57-cloud-amd64`), or None."""
    releases = [p[len('linux-image-'):] for p in packages if re.match(r'^linux-image-\d', p)]
    if not releases:
        return None
    return max(releases, key=lambda r: [int(n) for n in re.findall(r'\d+', r)])


def new_machine_id():
    return secrets.token_hex(16)


def boot(contents, runtime, settings, instance_id):
    """What happens when the VM boots: enabled services start, systemd fills an empty machine-id,
    cloud-init runs once per instance (regenerating SSH host keys) and ends as the settings say."""
    c = contents
    kernel = newest_kernel(c['packages'])
    if kernel:
        c['os']['kernel_release'] = kernel  # GRUB boots the newest installed kernel
    runtime.active = set(name for name, svc in c['services'].items() if svc.get('enabled') or svc.get('static'))
    if not c['machine_id']:
        c['machine_id'] = new_machine_id()
    if 'cloud-init' in c['packages']:
        ci = c['cloud_init']
        if ci['status'] == 'not-run' or ci.get('instance_id') != instance_id:
            ci['instance_id'] = instance_id
            ci['status'] = settings.get('cloud_init') or 'done'
            ci['logs'] = True
            c['ssh_host_keys'] = True
            runtime.cloud_init_done_at = float(settings.get('cloud_init_secs', 10))
    elif not c['ssh_host_keys'] and 'openssh-server' in c['packages']:
        c['ssh_host_keys'] = True  # sshd-keygen on first boot without cloud-init


def os_info(contents):
    o = contents['os']
    return {'id': o.get('id'), 'name': o.get('name'), 'pretty-name': o.get('pretty_name'),
            'version': o.get('version'), 'version-id': o.get('version_id'),
            'kernel-release': o.get('kernel_release'),
            'kernel-version': PROFILES[contents['profile']].get('kernel_version', '#1 SMP'),
            'machine': 'x86_64'}

/* The node zygote's native half: fork one confined child per JavaScript step.
 *
 * Built as a node addon (N-API, a stable C ABI; the few declarations it needs are written out
 * below, so no node headers are needed). `serve(control_fd, host_net_fd)` loops in C and
 * returns only in a step child, confined, with `uv_loop_fork` done; the zygote itself never
 * runs JavaScript again once it serves, so its heap and its memory map stay as they were.
 *
 * One request on the control socket (SOCK_SEQPACKET, from the Python zygote) carries a recipe
 * (the layout is in sandbox/node_fork.py, `encode_recipe`) and four fds: the step channel, the
 * stdout and stderr pipes, and the read end of the go-ahead pipe. For each:
 *
 *   node --fork(3), once--> the server --clone(2) with the namespace flags, per step--> step child
 *
 * The node that loaded and warmed the runner has threads (node's platform and inspector
 * threads); after those only fork(3) is safe, which also runs the atfork handlers that libc and
 * libuv need (libuv's signal lock pipe). So it forks once, and exits: its single-threaded copy,
 * the server, is reparented to the Python zygote (the nearest subreaper) and serves from then
 * on, in C, never running JavaScript. It clones each step child with CLONE_PARENT and the
 * namespace flags (a pid namespace takes effect only for a new child): one copy of the address
 * space per step, made by a single-threaded process. The child's parent is the Python zygote,
 * which reaps it, writes its id maps and cgroups, and then says go, exactly as for a child it
 * cloned itself. The server says hello with its pid first; the Python zygote watches that pid.
 *
 * The child then applies the layers in the order of sandbox/layers/__init__.py RECIPE, failing
 * closed: a failed layer sends a `sandbox` error frame and exits with 71.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

/* --- N-API, as declared in node_api.h (stable ABI) ----------------------------------------- */
typedef struct napi_env__ *napi_env;
typedef struct napi_value__ *napi_value;
typedef struct napi_callback_info__ *napi_callback_info;
typedef int napi_status;
typedef napi_value (*napi_callback)(napi_env, napi_callback_info);
struct uv_loop_s;
napi_status napi_create_function(napi_env, const char *, size_t, napi_callback, void *,
                                 napi_value *);
napi_status napi_set_named_property(napi_env, napi_value, const char *, napi_value);
napi_status napi_get_cb_info(napi_env, napi_callback_info, size_t *, napi_value *, napi_value *,
                             void **);
napi_status napi_get_value_int32(napi_env, napi_value, int32_t *);
napi_status napi_create_int32(napi_env, int32_t, napi_value *);
napi_status napi_create_string_utf8(napi_env, const char *, size_t, napi_value *);
napi_status napi_create_array_with_length(napi_env, size_t, napi_value *);
napi_status napi_set_element(napi_env, napi_value, uint32_t, napi_value);
napi_status napi_throw_error(napi_env, const char *, const char *);
napi_status napi_get_uv_event_loop(napi_env, struct uv_loop_s **);
int uv_loop_fork(struct uv_loop_s *);

/* --- the layers, by bit, in the order of sandbox/layers ALL_LAYERS ------------------------ */
static const char *const LAYER_NAMES[] = {
    "close_fds", "clean_env", "userns",        "pidns",         "netns",       "mountns",
    "fs_view",   "ipcns",     "utsns",         "uid_drop",      "private_proc", "cgroup_memory",
    "cgroup_pids", "rlimits", "no_new_privs",  "seccomp",
};
enum {
  L_CLOSE_FDS, L_CLEAN_ENV, L_USERNS, L_PIDNS, L_NETNS, L_MOUNTNS, L_FS_VIEW, L_IPCNS, L_UTSNS,
  L_UID_DROP, L_PRIVATE_PROC, L_CGROUP_MEMORY, L_CGROUP_PIDS, L_RLIMITS, L_NO_NEW_PRIVS,
  L_SECCOMP, L_COUNT
};
#define HAS(recipe, layer) ((recipe)->layers & (1u << (layer)))

#define RECIPE_MAGIC 0x31464e52u /* "RNF1" */
#define REQUEST_MAX (256 * 1024)
#define RLIMITS_MAX 16
#define PATH_MAX_LEN 4096
#define EXIT_SETUP 70
#define EXIT_LAYER 71
#define CHANNEL 3

struct rlimit_entry { uint32_t resource; uint64_t soft, hard; };
struct recipe {
  uint32_t clone_flags, layers, uid, parent_pid, tmp_mb, network;
  uint32_t n_rlimits;
  struct rlimit_entry rlimits[RLIMITS_MAX];
  const uint8_t *seccomp; uint32_t seccomp_len;
  char view_root[PATH_MAX_LEN];
  const char *extra; uint32_t extra_len; /* JSON for the JavaScript side, passed through */
};

/* --- recipe decoding: every length checked against what is left ---------------------------- */
struct reader { const uint8_t *at, *end; int ok; };
static uint32_t take_u32(struct reader *r) {
  uint32_t v = 0;
  if (r->end - r->at < 4) { r->ok = 0; return 0; }
  memcpy(&v, r->at, 4); r->at += 4; return v;
}
static uint64_t take_u64(struct reader *r) {
  uint64_t v = 0;
  if (r->end - r->at < 8) { r->ok = 0; return 0; }
  memcpy(&v, r->at, 8); r->at += 8; return v;
}
static const uint8_t *take_bytes(struct reader *r, uint32_t *len) {
  *len = take_u32(r);
  if (!r->ok || (uint64_t)(r->end - r->at) < *len) { r->ok = 0; return NULL; }
  const uint8_t *p = r->at; r->at += *len; return p;
}
static int decode_recipe(const uint8_t *data, size_t size, struct recipe *out) {
  struct reader r = {data, data + size, 1};
  memset(out, 0, sizeof *out);
  if (take_u32(&r) != RECIPE_MAGIC) return -1;
  out->clone_flags = take_u32(&r); out->layers = take_u32(&r); out->uid = take_u32(&r);
  out->parent_pid = take_u32(&r); out->tmp_mb = take_u32(&r); out->network = take_u32(&r);
  out->n_rlimits = take_u32(&r);
  if (!r.ok || out->n_rlimits > RLIMITS_MAX) return -1;
  for (uint32_t i = 0; i < out->n_rlimits; i++) {
    out->rlimits[i].resource = take_u32(&r);
    out->rlimits[i].soft = take_u64(&r); out->rlimits[i].hard = take_u64(&r);
  }
  out->seccomp = take_bytes(&r, &out->seccomp_len);
  uint32_t root_len; const uint8_t *root = take_bytes(&r, &root_len);
  out->extra = (const char *)take_bytes(&r, &out->extra_len);
  if (!r.ok || r.at != r.end || root_len >= PATH_MAX_LEN || out->seccomp_len % 8) return -1;
  memcpy(out->view_root, root, root_len);
  out->view_root[root_len] = 0;
  return 0;
}

/* --- the child's error frame: msgpack of StepResult(ok=False, error=StepError("sandbox", m)) */
static size_t put_str(uint8_t *at, const char *s, size_t n) {
  if (n > 255) n = 255;
  if (n < 32) { at[0] = 0xa0 | (uint8_t)n; memcpy(at + 1, s, n); return n + 1; }
  at[0] = 0xd9; at[1] = (uint8_t)n; memcpy(at + 2, s, n); return n + 2;
}
static void send_layer_error(int fd, const char *layer, int err) {
  char message[200];
  snprintf(message, sizeof message, "layer %s: %s", layer, strerror(err));
  uint8_t frame[400]; size_t n = 4;
  frame[n++] = 0x83; /* {type: "result", ok: false, error: {type: "sandbox", message}} */
  n += put_str(frame + n, "type", 4); n += put_str(frame + n, "result", 6);
  n += put_str(frame + n, "ok", 2); frame[n++] = 0xc2;
  n += put_str(frame + n, "error", 5); frame[n++] = 0x82;
  n += put_str(frame + n, "type", 4); n += put_str(frame + n, "sandbox", 7);
  n += put_str(frame + n, "message", 7); n += put_str(frame + n, message, strlen(message));
  uint32_t length = (uint32_t)(n - 4);
  frame[0] = length >> 24; frame[1] = length >> 16; frame[2] = length >> 8; frame[3] = length;
  ssize_t unused = write(fd, frame, n);
  (void)unused;
}

#define FDS_MAX 1024

/* Layer close_fds. 0 = /dev/null, 1 = stdout, 2 = stderr, 3 = the step channel, as in
 * sandbox/layers/fds.py. Every other fd is the server's, and is replaced by /dev/null at the
 * same number rather than closed: libuv still holds the numbers of node's loop and closes them
 * in uv_loop_fork, and a closed number could by then be a new fd of the child's. That includes
 * libuv's signal lock pipe, which every child would otherwise share: its lock then reads
 * /dev/null, which takes it at once (a child has one thread that uses it). Nothing of the
 * server's is reachable afterwards. */
static int arrange_fds(const int fds[4]) {
  int staged[3];
  for (int i = 0; i < 3; i++)
    if ((staged[i] = fcntl(fds[(i + 1) % 3], F_DUPFD_CLOEXEC, 16)) < 0) return -1;
  /* staged = stdout, stderr, channel */
  int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
  if (devnull < 0) return -1;
  /* The channel and the placeholders are close-on-exec: a program the step runs gets only its
   * stdio, as on the exec path. */
  if (dup2(devnull, 0) < 0 || dup2(staged[0], 1) < 0 || dup2(staged[1], 2) < 0 ||
      dup3(staged[2], CHANNEL, O_CLOEXEC) < 0)
    return -1;
  DIR *dir = opendir("/proc/self/fd");
  if (!dir) return -1;
  int listing = dirfd(dir), ours[] = {staged[0], staged[1], staged[2], devnull, listing};
  struct dirent *entry;
  int to_cover[FDS_MAX], n = 0;
  while ((entry = readdir(dir))) {
    if (entry->d_name[0] == '.') continue;
    int fd = atoi(entry->d_name), own = 0;
    for (size_t i = 0; i < sizeof ours / sizeof *ours; i++) own |= fd == ours[i];
    if (fd <= CHANNEL || own) continue;
    if (n == FDS_MAX) { closedir(dir); errno = EMFILE; return -1; }
    to_cover[n++] = fd;
  }
  closedir(dir);
  for (int i = 0; i < n; i++)
    if (dup3(devnull, to_cover[i], O_CLOEXEC) < 0) return -1;
  for (int i = 0; i < 3; i++) close(staged[i]);
  close(devnull);
  return 0;
}

/* --- the other layers ---------------------------------------------------------------------- */
static int become_namespace_root(void) {
  return setresgid(0, 0, 0) || setresuid(0, 0, 0) ? -1 : 0;
}

static int mount_step_dirs(const struct recipe *r) {
  char path[PATH_MAX_LEN + 16], options[64];
  if (mount(r->view_root, r->view_root, NULL, MS_BIND | MS_REC, NULL)) return -1;
  snprintf(path, sizeof path, "%s/tmp", r->view_root);
  snprintf(options, sizeof options, "size=%um,mode=1777", r->tmp_mb);
  return mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options);
}

static int mount_proc(const struct recipe *r) {
  char path[PATH_MAX_LEN + 16];
  snprintf(path, sizeof path, "%s/proc", r->view_root);
  return mount("proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

static int enter_view(const struct recipe *r) {
  if (!HAS(r, L_PRIVATE_PROC)) {
    char path[PATH_MAX_LEN + 16];
    snprintf(path, sizeof path, "%s/proc", r->view_root);
    if (mount("/proc", path, NULL, MS_BIND | MS_REC, NULL)) return -1;
  }
  if (chdir(r->view_root) || syscall(SYS_pivot_root, ".", ".") || umount2(".", MNT_DETACH))
    return -1;
  return chdir("/");
}

static int set_hostname(void) { return sethostname("runnerd-step", 12); }

static int drop_to_uid(const struct recipe *r) {
  if (HAS(r, L_USERNS)) return 0; /* the slot uid is the namespace root's outside id already */
  return setresgid(r->uid, r->uid, r->uid) || setresuid(r->uid, r->uid, r->uid) ? -1 : 0;
}

static int apply_rlimits(const struct recipe *r) {
  for (uint32_t i = 0; i < r->n_rlimits; i++) {
    struct rlimit limit = {r->rlimits[i].soft, r->rlimits[i].hard};
    if (setrlimit((int)r->rlimits[i].resource, &limit)) return -1;
  }
  signal(SIGXFSZ, SIG_IGN); /* an over-size write fails with EFBIG instead of killing the step */
  return 0;
}

struct cap_header { uint32_t version; int pid; };
struct cap_data { uint32_t effective, permitted, inheritable; };
static int drop_capabilities(void) {
  int last = 40;
  FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
  if (f) { if (fscanf(f, "%d", &last) != 1) last = 40; fclose(f); }
  for (int cap = 0; cap <= last; cap++)
    if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)) return -1;
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)) return -1;
  if (prctl(PR_SET_SECUREBITS, 0x01 | 0x02 | 0x04 | 0x08 | 0x20, 0, 0, 0)) return -1;
  struct cap_header header = {0x20080522, 0};
  struct cap_data data[2] = {{0, 0, 0}, {0, 0, 0}};
  return (int)syscall(SYS_capset, &header, data);
}

static int set_no_new_privs(void) { return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); }

static int load_seccomp(const struct recipe *r) {
  struct sock_fprog program = {(unsigned short)(r->seccomp_len / 8),
                               (struct sock_filter *)r->seccomp};
  return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program, 0, 0);
}

static int parent_is_zygote(const struct recipe *r) {
  /* In a pid namespace the parent is outside it and getppid() is 0 from the start. */
  return HAS(r, L_PIDNS) ? getppid() == 0 : getppid() == (pid_t)r->parent_pid;
}

/* The child's path, top to bottom, as sandbox/child.py and sandbox/layers RECIPE. */
static void confine(const struct recipe *r, const int fds[4]) {
  char go = 0;
  int fd = fds[0]; /* where a layer failure is reported: the channel, at 3 once arranged */
  if (setsid() < 0 || read(fds[3], &go, 1) != 1 || go != '1') _exit(EXIT_SETUP);
  close(fds[3]);
  /* The parent is the Python zygote (CLONE_PARENT): the parent-death signal is armed against
   * it, and checked. */
  if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) || !parent_is_zygote(r)) _exit(EXIT_SETUP);
#define LAYER(bit, call)                                                                       \
  if (HAS(r, bit) && (call) != 0) { send_layer_error(fd, LAYER_NAMES[bit], errno); _exit(EXIT_LAYER); }
  LAYER(L_CLOSE_FDS, arrange_fds(fds));
  if (HAS(r, L_CLOSE_FDS)) fd = CHANNEL;
  LAYER(L_USERNS, become_namespace_root());
  LAYER(L_MOUNTNS, mount_step_dirs(r));
  LAYER(L_PRIVATE_PROC, mount_proc(r));
  LAYER(L_FS_VIEW, enter_view(r));
  LAYER(L_UTSNS, set_hostname());
  LAYER(L_UID_DROP, drop_to_uid(r));
  LAYER(L_RLIMITS, apply_rlimits(r));
  LAYER(L_USERNS, drop_capabilities());
  LAYER(L_NO_NEW_PRIVS, set_no_new_privs());
  LAYER(L_SECCOMP, load_seccomp(r));
#undef LAYER
  /* A change of credentials clears the parent-death signal (prctl(2)): set it again. */
  if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) || !parent_is_zygote(r)) _exit(EXIT_SETUP);
}

/* --- the zygote's loop --------------------------------------------------------------------- */

/* V8 marks its heap MADV_DONTFORK; a child without those pages dies on its first instruction.
 * Marked once, before serving: nothing runs JavaScript in the zygote after that. */
static void let_the_heap_fork(void) {
  FILE *maps = fopen("/proc/self/maps", "re");
  if (!maps) return;
  char line[512];
  while (fgets(line, sizeof line, maps)) {
    unsigned long start, end;
    if (sscanf(line, "%lx-%lx", &start, &end) == 2 && !strstr(line, "[v"))
      madvise((void *)start, end - start, MADV_DOFORK);
  }
  fclose(maps);
}

static void reply(int control, int32_t pid, const char *message) {
  char buffer[256];
  size_t n = message ? strlen(message) : 0;
  if (n > sizeof buffer - 4) n = sizeof buffer - 4;
  memcpy(buffer, &pid, 4);
  if (n) memcpy(buffer + 4, message, n);
  if (send(control, buffer, 4 + n, MSG_NOSIGNAL) < 0) _exit(0); /* the Python zygote is gone */
}

static void close_all(const int *fds, int n) {
  for (int i = 0; i < n; i++) if (fds[i] >= 0) close(fds[i]);
}

/* Receive one request. Returns its size, with exactly four fds in `fds`, or -1 after closing
 * whatever came with a malformed one (answered, as every request is exactly once: the Python
 * side pairs each reply with its request). The zygote exits when the control socket closes. */
static ssize_t receive(int control, uint8_t *data, int fds[4]) {
  char space[CMSG_SPACE(8 * sizeof(int))];
  struct iovec iov = {data, REQUEST_MAX};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = space,
                       .msg_controllen = sizeof space};
  ssize_t size;
  do size = recvmsg(control, &msg, MSG_CMSG_CLOEXEC); while (size < 0 && errno == EINTR);
  if (size <= 0) _exit(0);
  int got = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    int *passed = (int *)CMSG_DATA(c);
    for (int i = 0; i < count; i++) {
      if (got < 4) fds[got] = passed[i]; else close(passed[i]);
      got++;
    }
  }
  if (size < 0 || got != 4 || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
    close_all(fds, got < 4 ? got : 4);
    return -1;
  }
  return size;
}

/* Clone one step child from the server, straight into the Python zygote's care (CLONE_PARENT).
 * A step with network is cloned from the host's network namespace; the server itself goes
 * back to its empty one at once, and exits if it cannot (it must never clone a step without
 * network from the host's). Returns the pid, 0 in the child, or -errno. */
static pid_t clone_step(const struct recipe *r, int host_net, int own_net) {
  int in_host = r->network && host_net >= 0;
  if (in_host && setns(host_net, CLONE_NEWNET) != 0) return -errno;
  pid_t pid = (pid_t)syscall(SYS_clone, (unsigned long)(r->clone_flags | CLONE_PARENT | SIGCHLD),
                             0, 0, 0, 0);
  if (pid == 0) return 0;
  int error = errno;
  if (in_host && setns(own_net, CLONE_NEWNET) != 0) _exit(EXIT_SETUP);
  return pid < 0 ? -error : pid;
}

/* In the server: wait until the node that forked it is gone, so that the Python zygote (the
 * nearest subreaper) is the parent, and arm the parent-death signal against it. */
static void become_the_server(int control, pid_t node, pid_t zygote) {
  for (int waited = 0; getppid() == node; waited++) {
    if (waited > 50000) _exit(EXIT_SETUP); /* 5 s */
    usleep(100);
  }
  if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) || getppid() != zygote) _exit(EXIT_SETUP);
  reply(control, (int32_t)getpid(), NULL); /* hello: the pid to watch from now on */
}

static struct uv_loop_s *loop;
static struct recipe current;

/* serve(control_fd, host_net_fd): returns, in a step child only, the recipe's JSON extra. */
static napi_value serve(napi_env env, napi_callback_info info) {
  size_t argc = 2; napi_value argv[2]; int32_t control, host_net;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2 || napi_get_value_int32(env, argv[0], &control) ||
      napi_get_value_int32(env, argv[1], &host_net)) {
    napi_throw_error(env, NULL, "serve(control_fd, host_net_fd)");
    return NULL;
  }
  napi_get_uv_event_loop(env, &loop);
  let_the_heap_fork();
  int own_net = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  pid_t node = getpid(), zygote = getppid();
  if (own_net < 0) { napi_throw_error(env, NULL, "/proc/self/ns/net"); return NULL; }
  pid_t server = fork();
  if (server < 0) { napi_throw_error(env, NULL, "fork"); return NULL; }
  if (server > 0) _exit(0); /* the node with threads is done; its copy serves */
  become_the_server(control, node, zygote);
  static uint8_t request[REQUEST_MAX];
  for (;;) {
    int fds[4] = {-1, -1, -1, -1};
    ssize_t size = receive(control, request, fds);
    /* What a longer earlier request left past this one's end (another slot's paths and limits)
     * is not copied into this child (256 KiB cleared: ~10 us). */
    size_t used = size > 0 ? (size_t)size : 0;
    memset(request + used, 0, REQUEST_MAX - used);
    if (size < 0) { reply(control, -EINVAL, "a malformed request"); continue; }
    if (decode_recipe(request, (size_t)size, &current) != 0) {
      close_all(fds, 4); reply(control, -EINVAL, "a malformed recipe"); continue;
    }
    pid_t pid = clone_step(&current, host_net, own_net);
    if (pid == 0) {
      confine(&current, fds);
      /* Only the step child gets here, confined. */
      if (uv_loop_fork(loop) != 0) _exit(EXIT_SETUP);
      napi_value extra;
      napi_create_string_utf8(env, current.extra, current.extra_len, &extra);
      return extra;
    }
    close_all(fds, 4);
    reply(control, pid, pid > 0 ? NULL : strerror(-pid));
  }
}

static napi_value exit_now(napi_env env, napi_callback_info info) {
  size_t argc = 1; napi_value argv[1]; int32_t code = 0;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc >= 1) napi_get_value_int32(env, argv[0], &code);
  _exit(code); /* node's own exit would join platform threads that do not exist in a child */
}

static napi_value current_pid(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value value;
  napi_create_int32(env, (int32_t)getpid(), &value);
  return value;
}

static void export_function(napi_env env, napi_value exports, const char *name, napi_callback f) {
  napi_value fn;
  napi_create_function(env, name, strlen(name), f, NULL, &fn);
  napi_set_named_property(env, exports, name, fn);
}

napi_value napi_register_module_v1(napi_env env, napi_value exports) {
  export_function(env, exports, "serve", serve);
  export_function(env, exports, "exit", exit_now);
  export_function(env, exports, "getpid", current_pid);
  napi_value names;
  napi_create_array_with_length(env, L_COUNT, &names);
  for (uint32_t i = 0; i < L_COUNT; i++) {
    napi_value name;
    napi_create_string_utf8(env, LAYER_NAMES[i], strlen(LAYER_NAMES[i]), &name);
    napi_set_element(env, names, i, name);
  }
  napi_set_named_property(env, exports, "layers", names);
  return exports;
}

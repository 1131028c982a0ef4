/* A GCKS and three members on loopback multicast, driven the sans-IO way: this program owns
 * every UDP socket and the clock, feeds the endpoints what arrives and when their deadlines
 * come, and sends what they poll out.
 *
 * 1. The GCKS admits members 1, 2 and 3; each member endpoint is made from the registration
 *    bundle the GCKS hands out, and all three install the same traffic key.
 * 2. Member 3 leaves; members 1 and 2 install the next traffic key, member 3 does not.
 *
 * Exits 0 when both steps were seen, 1 otherwise (or after 20 s).
 *
 * Build: see ffi/build.sh (pkg-config --cflags --libs rekeycast). */
#define _DEFAULT_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "rekeycast.h"

#define GROUP_IP "239.255.42.7"
#define MEMBERS 3
#define DEADLINE_US (20u * 1000u * 1000u)

#define CHECK(call)                                                                        \
  do {                                                                                     \
    rkc_result check_result_ = (call);                                                     \
    if (check_result_ != RKC_OK) {                                                         \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                        \
              rkc_result_name((int)check_result_));                                        \
      exit(1);                                                                             \
    }                                                                                      \
  } while (0)

struct member {
  uint64_t id;
  rkc_member_endpoint *endpoint;
  int listen_fd;   /* bound to the group's port, joined to the group on 127.0.0.1 */
  int feedback_fd; /* unicast, 127.0.0.1:any: NACKs to the GCKS */
  uint32_t spi;    /* the Data SA whose key it installed last (0: none) */
  uint8_t key[RKC_KEY_LEN];
};

static uint64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static rkc_addr to_rkc(const struct sockaddr_in *sin) {
  rkc_addr addr;
  memset(&addr, 0, sizeof addr);
  addr.family = RKC_ADDR_V4;
  addr.port = ntohs(sin->sin_port);
  memcpy(addr.ip, &sin->sin_addr, 4);
  return addr;
}

static struct sockaddr_in from_rkc(const rkc_addr *addr) {
  struct sockaddr_in sin;
  memset(&sin, 0, sizeof sin);
  sin.sin_family = AF_INET;
  sin.sin_port = htons(addr->port);
  memcpy(&sin.sin_addr, addr->ip, 4);
  return sin;
}

static int udp_socket(uint32_t ip, uint16_t port, int reuse) {
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  int one = 1;
  struct sockaddr_in sin;
  if (fd < 0) {
    perror("socket");
    exit(1);
  }
  if (reuse) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  memset(&sin, 0, sizeof sin);
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = ip;
  sin.sin_port = htons(port);
  if (bind(fd, (struct sockaddr *)&sin, sizeof sin) != 0) {
    perror("bind");
    exit(1);
  }
  return fd;
}

static struct sockaddr_in group_addr;
static int gcks_fd;
static rkc_gcks_endpoint *gcks;
static struct member members[MEMBERS];
static int member_count;

static void print_key(const char *what, const struct member *m) {
  printf("member %llu: %s: SPI %u, key %02x%02x%02x%02x...\n", (unsigned long long)m->id, what,
         m->spi, m->key[0], m->key[1], m->key[2], m->key[3]);
}

static void add_member(uint64_t id) {
  uint8_t bundle[RKC_MAX_BUNDLE_LEN];
  size_t bundle_len = 0;
  struct member *m = &members[member_count++];
  struct ip_mreq mreq;
  struct sockaddr_in feedback;
  socklen_t len = sizeof feedback;
  rkc_member_config config;

  CHECK(rkc_gcks_endpoint_take_bundle(gcks, id, bundle, sizeof bundle, &bundle_len));
  memset(m, 0, sizeof *m);
  m->id = id;
  m->listen_fd = udp_socket(htonl(INADDR_ANY), ntohs(group_addr.sin_port), 1);
  mreq.imr_multiaddr = group_addr.sin_addr;
  mreq.imr_interface.s_addr = htonl(INADDR_LOOPBACK);
  if (setsockopt(m->listen_fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mreq, sizeof mreq) != 0) {
    perror("IP_ADD_MEMBERSHIP");
    exit(1);
  }
  m->feedback_fd = udp_socket(htonl(INADDR_LOOPBACK), 0, 0);
  getsockname(gcks_fd, (struct sockaddr *)&feedback, &len);
  memset(&config, 0, sizeof config);
  config.group = to_rkc(&group_addr);
  config.feedback = to_rkc(&feedback);
  config.expiry_warning_secs = 60;
  CHECK(rkc_member_endpoint_new(bundle, bundle_len, &config, now_us(), &m->endpoint));
  memset(bundle, 0, sizeof bundle); /* the bundle holds the member's secret keys */
  printf("member %llu: registered (%zu-byte bundle)\n", (unsigned long long)id, bundle_len);
}

/* Sends what every endpoint has to send and handles what they report. */
static void drain(void) {
  uint8_t buf[RKC_DATAGRAM_SIZE];
  rkc_transmit tx;
  rkc_gcks_event gev;
  rkc_member_event mev;
  int i;
  rkc_result r;

  while ((r = rkc_gcks_endpoint_poll_event(gcks, &gev)) == RKC_OK) {
    switch (gev.kind) {
      case RKC_GCKS_JOINED:
        add_member(gev.member);
        break;
      case RKC_GCKS_LEFT:
        printf("gcks: member %llu leaves in the next batch\n", (unsigned long long)gev.member);
        break;
      case RKC_GCKS_REKEYED:
        printf("gcks: message %llu built, %llu members\n", (unsigned long long)gev.seq,
               (unsigned long long)gev.members);
        break;
      case RKC_GCKS_SENT:
        printf("gcks: message %llu sent\n", (unsigned long long)gev.seq);
        break;
      default:
        printf("gcks: event %d (%s)\n", (int)gev.kind, rkc_result_name((int)gev.error));
        break;
    }
  }
  if (r != RKC_DONE) CHECK(r);
  while ((r = rkc_gcks_endpoint_poll_transmit(gcks, now_us(), buf, sizeof buf, &tx)) == RKC_OK) {
    struct sockaddr_in to = tx.to_group ? group_addr : from_rkc(&tx.to);
    sendto(gcks_fd, buf, tx.len, 0, (struct sockaddr *)&to, sizeof to);
  }
  if (r != RKC_DONE) CHECK(r);
  for (i = 0; i < member_count; i++) {
    struct member *m = &members[i];
    while ((r = rkc_member_endpoint_poll_transmit(m->endpoint, now_us(), buf, sizeof buf, &tx)) ==
           RKC_OK) {
      struct sockaddr_in to = from_rkc(&tx.to);
      sendto(m->feedback_fd, buf, tx.len, 0, (struct sockaddr *)&to, sizeof to);
    }
    if (r != RKC_DONE) CHECK(r);
    while ((r = rkc_member_endpoint_poll_event(m->endpoint, &mev)) == RKC_OK) {
      if (mev.kind == RKC_MEMBER_KEY_INSTALLED) {
        m->spi = mev.spi;
        CHECK(rkc_member_endpoint_traffic_key(m->endpoint, mev.spi, m->key, sizeof m->key));
        print_key("installed", m);
      } else {
        printf("member %llu: event %d (seq %llu)\n", (unsigned long long)m->id, (int)mev.kind,
               (unsigned long long)mev.seq);
      }
    }
    if (r != RKC_DONE) CHECK(r);
  }
}

/* One turn: sleep until a socket is readable or a deadline comes, then act on it. */
static void turn(void) {
  struct pollfd fds[1 + 2 * MEMBERS];
  uint8_t buf[65536];
  uint64_t now = now_us(), next = now + 100000, deadline;
  int n = 0, i, wait_ms;

  drain();
  if (rkc_gcks_endpoint_timeout(gcks, &deadline) == RKC_OK && deadline < next) next = deadline;
  for (i = 0; i < member_count; i++)
    if (rkc_member_endpoint_timeout(members[i].endpoint, &deadline) == RKC_OK && deadline < next)
      next = deadline;
  wait_ms = next > now ? (int)((next - now + 999) / 1000) : 0;
  fds[n].fd = gcks_fd;
  fds[n++].events = POLLIN;
  for (i = 0; i < member_count; i++) {
    fds[n].fd = members[i].listen_fd;
    fds[n++].events = POLLIN;
    fds[n].fd = members[i].feedback_fd;
    fds[n++].events = POLLIN;
  }
  if (poll(fds, (nfds_t)n, wait_ms) < 0 && errno != EINTR) {
    perror("poll");
    exit(1);
  }
  for (i = 0; i < n; i++) {
    struct sockaddr_in from;
    socklen_t len = sizeof from;
    ssize_t got;
    rkc_addr src;
    if (!(fds[i].revents & POLLIN)) continue;
    got = recvfrom(fds[i].fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
    if (got < 0) continue;
    src = to_rkc(&from);
    if (i == 0) {
      CHECK(rkc_gcks_endpoint_handle_datagram(gcks, now_us(), &src, buf, (size_t)got));
    } else {
      struct member *m = &members[(i - 1) / 2];
      uint32_t port = (i - 1) % 2 == 0 ? RKC_PORT_LISTEN : RKC_PORT_FEEDBACK;
      CHECK(rkc_member_endpoint_handle_datagram(m->endpoint, now_us(), port, &src, buf,
                                                (size_t)got));
    }
  }
  now = now_us();
  if (rkc_gcks_endpoint_timeout(gcks, &deadline) == RKC_OK && deadline <= now)
    CHECK(rkc_gcks_endpoint_handle_timeout(gcks, now));
  for (i = 0; i < member_count; i++)
    if (rkc_member_endpoint_timeout(members[i].endpoint, &deadline) == RKC_OK && deadline <= now)
      CHECK(rkc_member_endpoint_handle_timeout(members[i].endpoint, now));
}

/* Whether the first `count` members hold the key of one SPI other than `not_spi`. */
static int agree(int count, uint32_t not_spi) {
  int i;
  if (member_count < count) return 0;
  for (i = 0; i < count; i++) {
    if (members[i].spi == 0 || members[i].spi == not_spi) return 0;
    if (members[i].spi != members[0].spi) return 0;
    if (memcmp(members[i].key, members[0].key, RKC_KEY_LEN) != 0) return 0;
  }
  return 1;
}

int main(void) {
  uint8_t signing_key[RKC_KEY_LEN];
  rkc_gcks_config config;
  uint64_t start = now_us();
  unsigned char ttl = 1, loop = 1;
  struct in_addr lo;
  uint32_t first_spi, second_spi;
  int i, ok;

  memset(&group_addr, 0, sizeof group_addr);
  group_addr.sin_family = AF_INET;
  group_addr.sin_port = htons((uint16_t)(20000 + getpid() % 20000));
  inet_pton(AF_INET, GROUP_IP, &group_addr.sin_addr);

  gcks_fd = udp_socket(htonl(INADDR_LOOPBACK), 0, 0);
  lo.s_addr = htonl(INADDR_LOOPBACK);
  setsockopt(gcks_fd, IPPROTO_IP, IP_MULTICAST_IF, &lo, sizeof lo);
  setsockopt(gcks_fd, IPPROTO_IP, IP_MULTICAST_TTL, &ttl, sizeof ttl);
  setsockopt(gcks_fd, IPPROTO_IP, IP_MULTICAST_LOOP, &loop, sizeof loop);

  CHECK(rkc_signing_key_generate(signing_key, sizeof signing_key));
  CHECK(rkc_gcks_config_default(&config));
  config.batch_interval_ms = 60000; /* batches only when asked (rekey_now) */
  config.admission_delay_ms = 50;
  CHECK(rkc_gcks_endpoint_new(&config, signing_key, sizeof signing_key, now_us(), &gcks));
  memset(signing_key, 0, sizeof signing_key);
  printf("gcks: group %s:%u\n", GROUP_IP, ntohs(group_addr.sin_port));

  for (i = 1; i <= MEMBERS; i++) CHECK(rkc_gcks_endpoint_join(gcks, (uint64_t)i, now_us()));
  CHECK(rkc_gcks_endpoint_rekey_now(gcks, now_us()));
  while (!agree(MEMBERS, 0) && now_us() - start < DEADLINE_US) turn();
  ok = agree(MEMBERS, 0);
  first_spi = members[0].spi;
  printf("%s: %d members share the traffic key of SPI %u\n", ok ? "ok" : "FAILED", MEMBERS,
         first_spi);

  if (ok) {
    uint8_t probe[RKC_KEY_LEN];
    CHECK(rkc_gcks_endpoint_leave(gcks, 3, now_us()));
    CHECK(rkc_gcks_endpoint_rekey_now(gcks, now_us()));
    /* Until members 1 and 2 share a key that member 3 does not hold. */
    while (!(agree(2, first_spi) && members[2].spi != members[0].spi) &&
           now_us() - start < DEADLINE_US)
      turn();
    /* A little longer, so that member 3 would have installed that key if it could. */
    for (i = 0; i < 5; i++) turn();
    second_spi = members[0].spi;
    ok = agree(2, first_spi) &&
         rkc_member_endpoint_traffic_key(members[2].endpoint, second_spi, probe, sizeof probe) ==
             RKC_NOT_FOUND;
    printf("%s: members 1 and 2 moved to SPI %u; member 3 does not hold it (its last: SPI %u)\n",
           ok ? "ok" : "FAILED", second_spi, members[2].spi);
  }

  CHECK(rkc_gcks_endpoint_stop(gcks, now_us()));
  drain();
  for (i = 0; i < member_count; i++) {
    CHECK(rkc_member_endpoint_stop(members[i].endpoint, now_us()));
    rkc_member_endpoint_free(&members[i].endpoint);
    memset(members[i].key, 0, RKC_KEY_LEN);
    close(members[i].listen_fd);
    close(members[i].feedback_fd);
  }
  rkc_gcks_endpoint_free(&gcks);
  close(gcks_fd);
  return ok ? 0 : 1;
}

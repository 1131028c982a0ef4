/* The C ABI's contracts, checked from C: NULL pointers are refused, short buffers are
 * refused without losing what they were to hold, outputs are written only on success, a
 * freed handle (freed twice, or used through a stale copy) is refused instead of touching
 * freed memory, and calls after stop return RKC_STOPPED; plus the engines' callbacks (key
 * installed, key expiring) with their userdata, on loopback multicast.
 *
 * Run under AddressSanitizer and valgrind by .ci/run. Ends with "N passed, N failed". */
#define _DEFAULT_SOURCE
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "rekeycast.h"

static int passed, failed;

#define EXPECT(what, cond)                                                                  \
  do {                                                                                      \
    if (cond) {                                                                             \
      passed++;                                                                             \
    } else {                                                                                \
      failed++;                                                                             \
      fprintf(stderr, "FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, what, #cond);             \
    }                                                                                       \
  } while (0)

#define EXPECT_RESULT(call, expected)                                                       \
  do {                                                                                      \
    rkc_result got_ = (call);                                                               \
    if (got_ == (expected)) {                                                               \
      passed++;                                                                             \
    } else {                                                                                \
      failed++;                                                                             \
      fprintf(stderr, "FAIL %s:%d: %s gave %s, expected %s\n", __FILE__, __LINE__, #call,   \
              rkc_result_name((int)got_), rkc_result_name((int)(expected)));                \
    }                                                                                       \
  } while (0)

static uint64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static rkc_addr v4(uint8_t a, uint8_t b, uint8_t c, uint8_t d, uint16_t port) {
  rkc_addr addr;
  memset(&addr, 0, sizeof addr);
  addr.family = RKC_ADDR_V4;
  addr.port = port;
  addr.ip[0] = a;
  addr.ip[1] = b;
  addr.ip[2] = c;
  addr.ip[3] = d;
  return addr;
}

static uint8_t signing_key[RKC_KEY_LEN];

/* A GCKS endpoint that admitted member 1: its bundle waits in the endpoint. */
static rkc_gcks_endpoint *gcks_with_bundle(void) {
  rkc_gcks_config config;
  rkc_gcks_endpoint *gcks = NULL;
  rkc_gcks_event event;
  uint64_t start = now_us(), deadline;
  int joined = 0;
  rkc_gcks_config_default(&config);
  config.key_seed = 7;
  if (rkc_gcks_endpoint_new(&config, signing_key, sizeof signing_key, now_us(), &gcks) != RKC_OK)
    return NULL;
  rkc_gcks_endpoint_join(gcks, 1, now_us());
  rkc_gcks_endpoint_rekey_now(gcks, now_us());
  while (!joined && now_us() - start < 10000000u) {
    while (rkc_gcks_endpoint_poll_event(gcks, &event) == RKC_OK)
      if (event.kind == RKC_GCKS_JOINED && event.member == 1) joined = 1;
    if (!joined && rkc_gcks_endpoint_timeout(gcks, &deadline) == RKC_OK) {
      if (deadline > now_us()) sleep_ms(5);
      rkc_gcks_endpoint_handle_timeout(gcks, now_us());
    }
  }
  return gcks;
}

static void test_result_names(void) {
  EXPECT("names", strcmp(rkc_result_name(RKC_OK), "RKC_OK") == 0);
  EXPECT("names", strcmp(rkc_result_name(RKC_BUFFER_TOO_SHORT), "RKC_BUFFER_TOO_SHORT") == 0);
  EXPECT("unknown", strcmp(rkc_result_name(-7), "RKC_UNKNOWN") == 0);
  EXPECT("unknown", strcmp(rkc_result_name(1000), "RKC_UNKNOWN") == 0);
}

static void test_null_pointers(void) {
  rkc_gcks_config config;
  rkc_gcks_endpoint *gcks = (rkc_gcks_endpoint *)0x1; /* a sentinel: must stay unwritten */
  rkc_member_endpoint *member = (rkc_member_endpoint *)0x1;
  rkc_member_config member_config;
  rkc_transmit tx;
  uint8_t buf[RKC_DATAGRAM_SIZE];
  uint64_t deadline = 42;
  rkc_addr from = v4(127, 0, 0, 1, 9);
  rkc_gcks_endpoint *live = NULL;

  rkc_gcks_config_default(&config);
  memset(&member_config, 0, sizeof member_config);
  EXPECT_RESULT(rkc_gcks_config_default(NULL), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_signing_key_generate(NULL, 32), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_new(NULL, signing_key, 32, 0, &gcks), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_new(&config, NULL, 32, 0, &gcks), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_new(&config, signing_key, 32, 0, NULL), RKC_NULL_POINTER);
  EXPECT("output unwritten", gcks == (rkc_gcks_endpoint *)0x1);
  EXPECT_RESULT(rkc_member_endpoint_new(NULL, 10, &member_config, 0, &member), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_member_endpoint_new(buf, 10, NULL, 0, &member), RKC_NULL_POINTER);
  EXPECT("output unwritten", member == (rkc_member_endpoint *)0x1);
  EXPECT_RESULT(rkc_gcks_endpoint_join(NULL, 1, 0), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_poll_transmit(NULL, 0, buf, sizeof buf, &tx), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_member_endpoint_traffic_key(NULL, 1, buf, 32), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_join(NULL, 1, 10), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_stop(NULL), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_member_stop(NULL), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_start(NULL, &from, 1, signing_key, 32, NULL), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_member_start(buf, 10, &member_config, 1, NULL, NULL), RKC_NULL_POINTER);

  /* A live handle with NULL arguments. */
  EXPECT_RESULT(rkc_gcks_endpoint_new(&config, signing_key, 32, now_us(), &live), RKC_OK);
  EXPECT_RESULT(rkc_gcks_endpoint_poll_transmit(live, now_us(), NULL, 2000, &tx), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_poll_transmit(live, now_us(), buf, sizeof buf, NULL),
                RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_handle_datagram(live, now_us(), NULL, buf, 10), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_handle_datagram(live, now_us(), &from, NULL, 10),
                RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_timeout(live, NULL), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_poll_event(live, NULL), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_take_bundle(live, 1, buf, sizeof buf, NULL), RKC_NULL_POINTER);
  EXPECT_RESULT(rkc_gcks_endpoint_timeout(live, &deadline), RKC_OK);
  EXPECT("deadline written on success", deadline != 42);

  /* Freeing NULL, or through a NULL slot, does nothing. */
  rkc_gcks_endpoint_free(NULL);
  rkc_member_endpoint_free(NULL);
  rkc_gcks_free(NULL);
  rkc_member_free(NULL);
  rkc_gcks_endpoint_free(&live);
  EXPECT("free clears the pointer", live == NULL);
}

static void test_invalid_arguments(void) {
  rkc_gcks_config config;
  rkc_gcks_endpoint *gcks = NULL;
  rkc_member_endpoint *member = NULL;
  rkc_member_config member_config;
  uint8_t junk[64];
  rkc_addr bad = v4(127, 0, 0, 1, 9);

  rkc_gcks_config_default(&config);
  EXPECT_RESULT(rkc_gcks_endpoint_new(&config, signing_key, 31, 0, &gcks), RKC_INVALID_ARGUMENT);
  config.batch_interval_ms = 0;
  EXPECT_RESULT(rkc_gcks_endpoint_new(&config, signing_key, 32, 0, &gcks), RKC_INVALID_CONFIG);
  EXPECT("no handle on failure", gcks == NULL);

  memset(junk, 'x', sizeof junk);
  memset(&member_config, 0, sizeof member_config);
  member_config.group = v4(239, 255, 42, 8, 7400);
  member_config.feedback = v4(127, 0, 0, 1, 7401);
  EXPECT_RESULT(rkc_member_endpoint_new(junk, sizeof junk, &member_config, 0, &member),
                RKC_INVALID_BUNDLE);
  EXPECT("no handle on failure", member == NULL);

  rkc_gcks_config_default(&config);
  EXPECT_RESULT(rkc_gcks_endpoint_new(&config, signing_key, 32, now_us(), &gcks), RKC_OK);
  bad.family = 9;
  EXPECT_RESULT(rkc_gcks_endpoint_handle_datagram(gcks, now_us(), &bad, junk, sizeof junk),
                RKC_INVALID_ARGUMENT);
  rkc_gcks_endpoint_free(&gcks);
}

static void test_short_buffers(void) {
  rkc_gcks_endpoint *gcks = gcks_with_bundle();
  rkc_member_endpoint *member = NULL;
  rkc_member_config member_config;
  rkc_transmit tx;
  uint8_t small[100], bundle[RKC_MAX_BUNDLE_LEN], key[RKC_KEY_LEN];
  size_t len = 0, written = 12345;

  EXPECT("admitted", gcks != NULL);
  if (!gcks) return;
  EXPECT_RESULT(rkc_signing_key_generate(small, 31), RKC_BUFFER_TOO_SHORT);
  EXPECT_RESULT(rkc_gcks_endpoint_poll_transmit(gcks, now_us(), small, sizeof small, &tx),
                RKC_BUFFER_TOO_SHORT);
  EXPECT_RESULT(rkc_gcks_endpoint_bundle_len(gcks, 1, &len), RKC_OK);
  EXPECT("a bundle", len > sizeof small);
  EXPECT_RESULT(rkc_gcks_endpoint_take_bundle(gcks, 1, small, sizeof small, &written),
                RKC_BUFFER_TOO_SHORT);
  EXPECT("written unchanged on failure", written == 12345);
  /* The bundle was not lost to the short buffer. */
  EXPECT_RESULT(rkc_gcks_endpoint_take_bundle(gcks, 1, bundle, len, &written), RKC_OK);
  EXPECT("whole bundle", written == len);
  EXPECT_RESULT(rkc_gcks_endpoint_take_bundle(gcks, 1, bundle, sizeof bundle, &written),
                RKC_NOT_FOUND);
  EXPECT_RESULT(rkc_gcks_endpoint_bundle_len(gcks, 1, &len), RKC_NOT_FOUND);

  memset(&member_config, 0, sizeof member_config);
  member_config.group = v4(239, 255, 42, 8, 7400);
  member_config.feedback = v4(127, 0, 0, 1, 7401);
  member_config.seed = 3;
  EXPECT_RESULT(rkc_member_endpoint_new(bundle, written, &member_config, now_us(), &member),
                RKC_OK);
  memset(bundle, 0, sizeof bundle);
  EXPECT_RESULT(rkc_member_endpoint_poll_transmit(member, now_us(), small, sizeof small, &tx),
                RKC_BUFFER_TOO_SHORT);
  /* No message was delivered: no key yet, and a short buffer is refused before that. */
  EXPECT_RESULT(rkc_member_endpoint_traffic_key(member, 1, key, sizeof key), RKC_NOT_FOUND);
  EXPECT_RESULT(rkc_member_endpoint_traffic_key(member, 1, key, 16), RKC_NOT_FOUND);
  rkc_member_endpoint_free(&member);
  rkc_gcks_endpoint_free(&gcks);
}

static void test_double_free_and_stale_handles(void) {
  rkc_gcks_config config;
  rkc_gcks_endpoint *gcks = NULL, *stale;
  rkc_member_endpoint *wrong_kind;
  uint64_t deadline;

  rkc_gcks_config_default(&config);
  EXPECT_RESULT(rkc_gcks_endpoint_new(&config, signing_key, 32, now_us(), &gcks), RKC_OK);
  /* A handle of one kind passed as another is refused. */
  wrong_kind = (rkc_member_endpoint *)gcks;
  EXPECT_RESULT(rkc_member_endpoint_timeout(wrong_kind, &deadline), RKC_INVALID_HANDLE);
  stale = gcks;
  rkc_gcks_endpoint_free(&gcks);
  EXPECT("free clears the pointer", gcks == NULL);
  rkc_gcks_endpoint_free(&gcks); /* a second free through the same variable: nothing */
  EXPECT_RESULT(rkc_gcks_endpoint_join(stale, 1, now_us()), RKC_INVALID_HANDLE);
  EXPECT_RESULT(rkc_gcks_endpoint_timeout(stale, &deadline), RKC_INVALID_HANDLE);
  rkc_gcks_endpoint_free(&stale); /* a free through a stale copy: nothing */
  EXPECT("stale copy cleared", stale == NULL);
}

static void test_calls_after_stop_sans_io(void) {
  rkc_gcks_endpoint *gcks = gcks_with_bundle();
  rkc_member_endpoint *member = NULL;
  rkc_member_config member_config;
  uint8_t bundle[RKC_MAX_BUNDLE_LEN], buf[RKC_DATAGRAM_SIZE];
  size_t written = 0;
  rkc_addr from = v4(127, 0, 0, 1, 9);

  EXPECT("admitted", gcks != NULL);
  if (!gcks) return;
  EXPECT_RESULT(rkc_gcks_endpoint_take_bundle(gcks, 1, bundle, sizeof bundle, &written), RKC_OK);
  EXPECT_RESULT(rkc_gcks_endpoint_stop(gcks, now_us()), RKC_OK);
  EXPECT_RESULT(rkc_gcks_endpoint_join(gcks, 2, now_us()), RKC_STOPPED);
  EXPECT_RESULT(rkc_gcks_endpoint_leave(gcks, 1, now_us()), RKC_STOPPED);
  EXPECT_RESULT(rkc_gcks_endpoint_rekey_now(gcks, now_us()), RKC_STOPPED);
  EXPECT_RESULT(rkc_gcks_endpoint_stop(gcks, now_us()), RKC_STOPPED);
  rkc_gcks_endpoint_free(&gcks);

  memset(&member_config, 0, sizeof member_config);
  member_config.group = v4(239, 255, 42, 8, 7400);
  member_config.feedback = v4(127, 0, 0, 1, 7401);
  EXPECT_RESULT(rkc_member_endpoint_new(bundle, written, &member_config, now_us(), &member),
                RKC_OK);
  memset(bundle, 0, sizeof bundle);
  EXPECT_RESULT(rkc_member_endpoint_stop(member, now_us()), RKC_OK);
  EXPECT_RESULT(rkc_member_endpoint_handle_timeout(member, now_us()), RKC_STOPPED);
  EXPECT_RESULT(rkc_member_endpoint_handle_datagram(member, now_us(), RKC_PORT_LISTEN, &from, buf,
                                                    10),
                RKC_STOPPED);
  EXPECT_RESULT(rkc_member_endpoint_stop(member, now_us()), RKC_STOPPED);
  rkc_member_endpoint_free(&member);
}

/* What the member engine's callbacks saw. */
struct seen {
  atomic_int installed;
  atomic_int expiring;
  atomic_uint spi;
  atomic_uint seconds_left;
};

static void on_installed(void *userdata, uint64_t seq, uint32_t spi, uint32_t lifetime_secs) {
  struct seen *seen = userdata;
  (void)seq;
  (void)lifetime_secs;
  atomic_store(&seen->spi, spi);
  atomic_fetch_add(&seen->installed, 1);
}

static void on_expiring(void *userdata, uint32_t spi, uint32_t seconds_left) {
  struct seen *seen = userdata;
  (void)spi;
  atomic_store(&seen->seconds_left, seconds_left);
  atomic_fetch_add(&seen->expiring, 1);
}

static int wait_for(atomic_int *counter, long timeout_ms) {
  long waited = 0;
  while (atomic_load(counter) == 0 && waited < timeout_ms) {
    sleep_ms(10);
    waited += 10;
  }
  return atomic_load(counter) > 0;
}

static void test_engines(void) {
  rkc_gcks_config config;
  rkc_gcks *gcks = NULL, *stale;
  rkc_member *member = NULL;
  rkc_member_config member_config;
  rkc_member_callbacks callbacks;
  rkc_gcks_event event;
  struct seen seen;
  rkc_addr group = v4(239, 255, 42, 9, (uint16_t)(20000 + getpid() % 20000)), feedback;
  uint8_t bundle[RKC_MAX_BUNDLE_LEN], key[RKC_KEY_LEN], zero[RKC_KEY_LEN];
  size_t written = 0;

  rkc_gcks_config_default(&config);
  config.batch_interval_ms = 50;
  config.admission_delay_ms = 500; /* time for the member to join the group */
  config.data_sa_lifetime_secs = 2;
  EXPECT_RESULT(rkc_gcks_start(&config, &group, 1, signing_key, 32, &gcks), RKC_OK);
  if (!gcks) return;
  EXPECT_RESULT(rkc_gcks_local_addr(gcks, &feedback), RKC_OK);
  EXPECT_RESULT(rkc_gcks_join(gcks, 1, 10000), RKC_OK);
  EXPECT_RESULT(rkc_gcks_join(gcks, 1, 10000), RKC_REFUSED);
  EXPECT_RESULT(rkc_gcks_leave(gcks, 99), RKC_REFUSED);
  EXPECT_RESULT(rkc_gcks_take_bundle(gcks, 1, bundle, sizeof bundle, &written), RKC_OK);

  memset(&seen, 0, sizeof seen);
  memset(&callbacks, 0, sizeof callbacks);
  callbacks.key_installed = on_installed;
  callbacks.key_expiring = on_expiring;
  callbacks.userdata = &seen;
  memset(&member_config, 0, sizeof member_config);
  member_config.group = group;
  member_config.feedback = feedback;
  member_config.expiry_warning_secs = 1;
  EXPECT_RESULT(rkc_member_start(bundle, written, &member_config, 1, &callbacks, &member), RKC_OK);
  memset(bundle, 0, sizeof bundle);
  if (!member) {
    rkc_gcks_free(&gcks);
    return;
  }
  EXPECT("key installed callback", wait_for(&seen.installed, 10000));
  memset(zero, 0, sizeof zero);
  memset(key, 0, sizeof key);
  EXPECT_RESULT(rkc_member_traffic_key(member, atomic_load(&seen.spi), key, 8),
                RKC_BUFFER_TOO_SHORT);
  EXPECT_RESULT(rkc_member_traffic_key(member, atomic_load(&seen.spi), key, sizeof key), RKC_OK);
  EXPECT("a key", memcmp(key, zero, sizeof key) != 0);
  {
    /* Resync items the product would carry: message 1 is already applied, so refused. */
    uint8_t manifest[RKC_DATAGRAM_SIZE], chunk[RKC_DATAGRAM_SIZE];
    size_t manifest_len = 0, chunk_len = 0;
    uint32_t order_key = 0;
    uint64_t applied = 77;
    EXPECT_RESULT(rkc_member_order_key(member, &order_key), RKC_OK);
    EXPECT_RESULT(rkc_gcks_resync_item(gcks, 99, order_key, manifest, sizeof manifest, chunk,
                                       sizeof chunk, &manifest_len, &chunk_len),
                  RKC_NOT_FOUND);
    EXPECT_RESULT(rkc_gcks_resync_item(gcks, 1, order_key, manifest, sizeof manifest, chunk, 4,
                                       &manifest_len, &chunk_len),
                  RKC_BUFFER_TOO_SHORT);
    EXPECT("nothing written", manifest_len == 0 && chunk_len == 0);
    EXPECT_RESULT(rkc_gcks_resync_item(gcks, 1, order_key, manifest, sizeof manifest, chunk,
                                       sizeof chunk, &manifest_len, &chunk_len),
                  RKC_OK);
    EXPECT("an item", manifest_len > 0 && chunk_len > 0);
    EXPECT_RESULT(rkc_member_resync(member, manifest, manifest_len, chunk, chunk_len, &applied),
                  RKC_REFUSED);
    EXPECT("nothing written", applied == 77);
    EXPECT_RESULT(rkc_member_resync(member, NULL, manifest_len, chunk, chunk_len, &applied),
                  RKC_NULL_POINTER);
  }
  EXPECT("key expiring callback", wait_for(&seen.expiring, 10000));
  EXPECT("expiring within its warning", atomic_load(&seen.seconds_left) <= 1);

  EXPECT_RESULT(rkc_member_stop(member), RKC_OK);
  EXPECT_RESULT(rkc_member_stop(member), RKC_STOPPED);
  /* Its keys stay readable until it is freed. */
  EXPECT_RESULT(rkc_member_traffic_key(member, atomic_load(&seen.spi), key, sizeof key), RKC_OK);
  rkc_member_free(&member);
  rkc_member_free(&member);
  EXPECT("member freed", member == NULL);
  memset(key, 0, sizeof key);

  while (rkc_gcks_poll_event(gcks, &event) == RKC_OK) {
  }
  EXPECT_RESULT(rkc_gcks_stop(gcks), RKC_OK);
  EXPECT_RESULT(rkc_gcks_stop(gcks), RKC_STOPPED);
  EXPECT_RESULT(rkc_gcks_join(gcks, 2, 100), RKC_STOPPED);
  EXPECT_RESULT(rkc_gcks_leave(gcks, 1), RKC_STOPPED);
  EXPECT_RESULT(rkc_gcks_rekey_now(gcks), RKC_STOPPED);
  EXPECT_RESULT(rkc_gcks_poll_event(gcks, &event), RKC_STOPPED);
  stale = gcks;
  rkc_gcks_free(&gcks);
  rkc_gcks_free(&gcks);
  EXPECT_RESULT(rkc_gcks_rekey_now(stale), RKC_INVALID_HANDLE);
}

int main(void) {
  if (rkc_signing_key_generate(signing_key, sizeof signing_key) != RKC_OK) return 1;
  test_result_names();
  test_null_pointers();
  test_invalid_arguments();
  test_short_buffers();
  test_double_free_and_stale_handles();
  test_calls_after_stop_sans_io();
  test_engines();
  memset(signing_key, 0, sizeof signing_key);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

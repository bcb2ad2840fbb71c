/*
 * runtime/workspace.c - per-thread scratch buffers reused across calls.  The
 * big intermediates of a forward (packed activations, hidden panels, expert
 * outputs) are tens of MB: allocating them afresh each call costs a page fault
 * and a kernel page clear per 4 KiB, a measured 15% of a forward. Each thread
 * keeps its buffers (grow-only) until it exits.
 */
#include "moe_impl.h"

#include <stdlib.h>

typedef struct moe_ws_slot {
    void  *ptr;
    size_t size;
} moe_ws_slot;

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>

static pthread_key_t moe_ws_key;
static pthread_once_t moe_ws_once = PTHREAD_ONCE_INIT;

static void
moe_ws_free(void *slots)
{
    moe_ws_slot *s = slots;
    int i;

    for (i = 0; i < MOE_WS_COUNT; i++) {
        free(s[i].ptr);
    }
    free(s);
}

static void
moe_ws_make_key(void)
{
    (void)pthread_key_create(&moe_ws_key, moe_ws_free);
}

static moe_ws_slot *
moe_ws_slots(void)
{
    moe_ws_slot *s;

    pthread_once(&moe_ws_once, moe_ws_make_key);
    s = pthread_getspecific(moe_ws_key);
    if (s == NULL) {
        s = calloc(MOE_WS_COUNT, sizeof(*s));
        if (s != NULL && pthread_setspecific(moe_ws_key, s) != 0) {
            free(s);
            s = NULL;
        }
    }
    return s;
}
#else
static moe_ws_slot *
moe_ws_slots(void)
{
    return NULL; /* no thread-local cache: plain allocations */
}
#endif

void *
moe_workspace(int slot, size_t count, size_t size)
{
    moe_ws_slot *s = moe_ws_slots();
    void *ptr;
    size_t bytes;

    if (size != 0 && count > SIZE_MAX / size) {
        moe_set_error(MOE_STATUS_ALLOC, "workspace of %zu x %zu bytes "
                      "overflows size_t", count, size);
        return NULL;
    }
    bytes = count * size != 0 ? count * size : 1;
    if (s == NULL) {
        return NULL;
    }
    if (s[slot].size >= bytes) {
        return s[slot].ptr;
    }
    ptr = moe_alloc(bytes, 1);
    if (ptr == NULL) {
        return NULL;
    }
    free(s[slot].ptr);
    s[slot].ptr = ptr;
    s[slot].size = bytes;
    return ptr;
}

/*
 * Preloaded into Debian's User-Mode-Linux 6.1 kernel (clusters/uml.py) on hosts whose
 * XSAVE area is larger than the 832 bytes that kernel keeps per task (AVX-512, AMX, PKRU).
 *
 * UML saves and restores each guest task's FPU state with ptrace(PTRACE_GETREGSET /
 * PTRACE_SETREGSET, NT_X86_XSTATE) on an 832-byte buffer. The host kernel accepts
 * SETREGSET only with the whole area (11,008 bytes on an AMX host), so UML's first
 * SETREGSET fails with EFAULT ("userspace - ptrace set fp regs failed, errno = 14") and
 * the guest panics before its init runs. Later UML kernels size the buffer from the host.
 *
 * Here each UML buffer gets a whole-size twin, keyed by the buffer's address (one per guest
 * task): GETREGSET reads the whole area into the twin and hands UML its first bytes;
 * SETREGSET lays UML's bytes (which it may have changed, as for a signal frame) over the
 * twin and writes the whole area. The state past UML's bytes is then kept per task, as a
 * kernel that knew its size would keep it. Every other ptrace call passes through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

struct twin {
	void *buffer;          /* UML's buffer for one task */
	unsigned char *whole;  /* the host-sized area kept for it */
};

static struct twin *twins;
static size_t twin_slots, twin_count;
static size_t host_bytes;  /* the XSAVE area the host's ptrace wants whole; 0 until known */

static long sys_ptrace(long request, pid_t pid, void *addr, void *data)
{
	return syscall(SYS_ptrace, request, pid, addr, data);
}

static size_t slot_of(void *buffer, size_t slots)
{
	return ((uintptr_t)buffer >> 4) & (slots - 1);
}

/* Open addressing, doubled at half full; entries are never removed (task addresses recur). */
static unsigned char *twin_of(void *buffer)
{
	if (twin_count * 2 >= twin_slots) {
		size_t slots = twin_slots ? twin_slots * 2 : 1024;
		struct twin *grown = calloc(slots, sizeof(*grown));
		if (!grown)
			return NULL;
		for (size_t i = 0; i < twin_slots; i++) {
			if (!twins[i].buffer)
				continue;
			size_t j = slot_of(twins[i].buffer, slots);
			while (grown[j].buffer)
				j = (j + 1) & (slots - 1);
			grown[j] = twins[i];
		}
		free(twins);
		twins = grown;
		twin_slots = slots;
	}
	size_t j = slot_of(buffer, twin_slots);
	while (twins[j].buffer && twins[j].buffer != buffer)
		j = (j + 1) & (twin_slots - 1);
	if (!twins[j].buffer) {
		unsigned char *whole = calloc(1, host_bytes);
		if (!whole)
			return NULL;
		twins[j].buffer = buffer;
		twins[j].whole = whole;
		twin_count++;
	}
	return twins[j].whole;
}

static void learn_host_bytes(pid_t pid, void *addr)
{
	static unsigned char probe[65536];
	struct iovec iov = { probe, sizeof(probe) };

	if (sys_ptrace(PTRACE_GETREGSET, pid, addr, &iov) == 0)
		host_bytes = iov.iov_len;
}

long ptrace(enum __ptrace_request request, ...)
{
	static long (*next)(int, ...);
	va_list ap;

	va_start(ap, request);
	pid_t pid = va_arg(ap, pid_t);
	void *addr = va_arg(ap, void *);
	void *data = va_arg(ap, void *);
	va_end(ap);

	if ((request == PTRACE_GETREGSET || request == PTRACE_SETREGSET) &&
	    (uintptr_t)addr == NT_X86_XSTATE && data) {
		struct iovec *iov = data;

		if (!host_bytes)
			learn_host_bytes(pid, addr);
		if (host_bytes && iov->iov_len < host_bytes) {
			unsigned char *whole = twin_of(iov->iov_base);
			if (whole) {
				struct iovec all = { whole, host_bytes };
				if (request == PTRACE_GETREGSET) {
					long done = sys_ptrace(PTRACE_GETREGSET, pid, addr, &all);
					if (done == 0)
						memcpy(iov->iov_base, whole, iov->iov_len);
					return done;
				}
				memcpy(whole, iov->iov_base, iov->iov_len);
				return sys_ptrace(PTRACE_SETREGSET, pid, addr, &all);
			}
		}
	}
	if (!next)
		next = (long (*)(int, ...))dlsym(RTLD_NEXT, "ptrace");
	return next(request, pid, addr, data);
}

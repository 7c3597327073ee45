//! Boot and CPL0 code (assembly only: under kvm_pvm every CPL0 instruction is emulated, so this
//! is kept to a minimum and integer-only).
//!
//! * `pvh_start32`: PVH entry (32-bit protected mode, paging off, `ebx` = hvm_start_info).
//!   Maps the first 1 GiB with 2 MiB pages (the rest of the map is built at CPL3, see
//!   `paging.rs`), enters long mode, builds the IDT, and drops to CPL3 in `guest_entry`.
//! * `tramp_start..tramp_end`: real-mode AP trampoline, copied to [`TRAMP_BASE`] by the BSP.
//!   An AP runs it after INIT-SIPI-SIPI, joins the same 32-bit path and enters CPL3 in
//!   `guest_entry` with its CPU index.
//! * `svc_entry`: kernel services, reached from CPL3 with `int3` (DPL3 gate). `rax` = service
//!   number, `rdi`/`rsi` = arguments, result in `rax`; clobbers `rcx`, `rdx`.
//! * `isr_common`: vectors >= 32 count into `irq_counts[vector]` and EOI the local APIC
//!   (x2APIC if `apic_x2` is set, else xAPIC MMIO); 0xff is the spurious vector (no EOI).
//!   Exceptions (< 32) switch to CPL3 `guest_fault` on an emergency stack, which reports and
//!   exits; a second fault writes port 0xf4 and halts.
//!
//! GDT: 0x08 kernel code64, 0x10 kernel data, 0x18 + 16*cpu TSS of `cpu`, 0x58|3 user data,
//! 0x60|3 user code64, 0x68 kernel code32. Each CPU's TSS has RSP0 and an 8 KiB all-zero I/O
//! bitmap (kvm_pvm ignores IOPL: only the bitmap grants CPL3 port access).

use core::arch::global_asm;

/// Maximum number of vCPUs that get a stack; further APs park with interrupts off.
pub const MAX_CPUS: usize = 4;
/// Physical address of the AP trampoline (SIPI vector 0x08).
pub const TRAMP_BASE: u64 = 0x8000;
/// Page directories available for the identity map: one per GiB of guest-physical space, up
/// to 1 TiB + 64 GiB (1 TiB of RAM ends at 1 TiB + 1 GiB, past the 32-bit hole). Those of GiBs
/// without RAM or MMIO are never written, so the host never backs them.
pub const NR_PDS: usize = 1088;
/// PDPT pages: one per 512 GiB, back to back, so `boot_pdpt[g]` is the entry of GiB `g`.
pub const NR_PDPTS: usize = NR_PDS.div_ceil(512);

/// Service numbers for `svc_entry`.
pub mod svc {
    /// wrmsr(ecx = rdi, value = rsi)
    pub const WRMSR: u64 = 0;
    /// rax = rdmsr(ecx = rdi)
    pub const RDMSR: u64 = 1;
    /// *(rdi as *mut u64) = rsi, at CPL0 (page-table entries)
    pub const WRITE64: u64 = 2;
    /// reload CR3 (flush the TLB)
    pub const FLUSH_TLB: u64 = 3;
    /// sti; hlt; cli (wait for an interrupt)
    pub const WAIT_IRQ: u64 = 4;
}

global_asm!(
    r#"
    .set MAX_CPUS, 4
    .set KSTACK_SIZE, 16384
    .set USTACK_SIZE, 262144
    .set TSS_SLOT, 0x3000
    .set NR_PDS, 1088
    .set NR_PDPTS, 3

    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi                      /* hvm_start_info (non-zero marks the BSP) */
    movl $(boot_pdpt + 7), boot_pml4    /* PML4[0] -> PDPT */
    movl $(boot_pds + 7), boot_pdpt     /* PDPT[0] -> PD of GiB 0 */
    mov $boot_pds, %edi
    mov $0x87, %eax                     /* P | RW | US | PS */
    mov $512, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    dec %ecx
    jnz 1b
    lgdt gdt_ptr
    ljmp $0x68, $common32

    /* Shared by BSP and APs: 32-bit protected mode -> long mode. esi = start_info or 0 (AP). */
common32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x620, %eax                    /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx               /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov $0x80010033, %eax               /* PG | WP | NE | ET | MP | PE */
    mov %eax, %cr0
    ljmp $0x08, $long64

    .code64
long64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    test %esi, %esi
    jz ap_long64
    mov %rsi, boot_start_info(%rip)
    mov $0xff, %al                      /* mask both PICs */
    out %al, $0x21
    out %al, $0xa1
    /* IDT: vector v -> isr_table + 16*v, interrupt gates, DPL0 */
    lea idt(%rip), %rdi
    lea isr_table(%rip), %rax
    mov $256, %ecx
2:  mov %rax, %rdx
    mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8E00, 4(%rdi)
    shr $16, %rdx
    mov %dx, 6(%rdi)
    shr $16, %rdx
    mov %edx, 8(%rdi)
    add $16, %rdi
    add $16, %rax
    dec %ecx
    jnz 2b
    /* vector 3 (int3): the service gate, DPL3 */
    lea idt+3*16(%rip), %rdi
    lea svc_entry(%rip), %rax
    mov %ax, (%rdi)
    movw $0xEE00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    xor %edi, %edi
    jmp cpu_enter_user

ap_long64:
    mov $1, %eax
    lock xadd %eax, ap_next_index(%rip)
    cmp $MAX_CPUS, %eax
    jae park
    mov %eax, %edi
    jmp cpu_enter_user
park:
    cli
    hlt
    jmp park

    /* edi = cpu index: kernel stack, TSS, GDT descriptor, ltr, lidt, then iretq to CPL3. */
cpu_enter_user:
    lea 1(%rdi), %eax
    imul $KSTACK_SIZE, %eax, %eax
    lea kstacks(%rip), %rsp
    add %rax, %rsp
    mov %edi, %eax
    imul $TSS_SLOT, %eax, %eax
    lea tss_area(%rip), %rbx
    add %rax, %rbx                      /* rbx = this CPU's TSS */
    mov %rsp, 4(%rbx)                   /* RSP0 */
    movw $104, 0x66(%rbx)               /* I/O bitmap right after the TSS */
    movb $0xff, 104+8192(%rbx)          /* bitmap terminator */
    mov %edi, %eax
    shl $4, %eax
    lea gdt64+0x18(%rip), %rdx
    add %rax, %rdx                      /* rdx = TSS descriptor */
    mov %ebx, %eax
    shl $16, %eax
    or $(104 + 8192), %eax
    mov %eax, (%rdx)
    mov %ebx, %eax
    shr $16, %eax
    and $0xff, %eax
    mov %ebx, %ecx
    and $0xff000000, %ecx
    or %ecx, %eax
    or $0x8900, %eax                    /* present, type 9 (available 64-bit TSS) */
    mov %eax, 4(%rdx)
    mov %rbx, %rax
    shr $32, %rax
    mov %eax, 8(%rdx)
    movl $0, 12(%rdx)
    lgdt gdt_ptr(%rip)
    lidt idt_ptr(%rip)
    mov %edi, %eax
    shl $4, %eax
    add $0x18, %eax
    ltr %ax
    lea 1(%rdi), %eax
    imul $USTACK_SIZE, %eax, %eax
    lea ustacks(%rip), %rcx
    add %rax, %rcx
    pushq $0x5b                         /* user SS */
    push %rcx                           /* user RSP */
    pushq $0x202                        /* IF = 1 */
    pushq $0x63                         /* user CS */
    lea user_entry(%rip), %rax
    push %rax
    mov boot_start_info(%rip), %rsi
    iretq
user_entry:
    call guest_entry                    /* (cpu, start_info) -> ! */
    ud2

    /* ---- kernel services: int3 from CPL3 ---- */
svc_entry:
    cmp $0, %rax
    je 10f
    cmp $1, %rax
    je 11f
    cmp $2, %rax
    je 12f
    cmp $3, %rax
    je 13f
    cmp $4, %rax
    je 14f
    mov $-1, %rax
    iretq
10: mov %edi, %ecx
    mov %rsi, %rax
    mov %rsi, %rdx
    shr $32, %rdx
    wrmsr
    xor %eax, %eax
    iretq
11: mov %edi, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    iretq
12: mov %rsi, (%rdi)
    xor %eax, %eax
    iretq
13: mov %cr3, %rax
    mov %rax, %cr3
    xor %eax, %eax
    iretq
14: sti
    hlt
    cli
    xor %eax, %eax
    iretq

    /* ---- interrupt and exception stubs: 16 bytes each ---- */
    .balign 16
isr_table:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:                             /* stack: vec, err, rip, cs, rflags, rsp, ss */
    cmpq $32, (%rsp)
    jb fault
    push %rax
    push %rcx
    push %rdx
    mov 24(%rsp), %rax
    cmp $0xff, %eax
    je 3f
    lock incl irq_counts(,%rax,4)
    cmpb $0, apic_x2(%rip)
    je 4f
    mov $0x80b, %ecx                    /* x2APIC EOI */
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    jmp 3f
4:  mov $0xfee000b0, %edx               /* xAPIC EOI */
    movl $0, (%rdx)
3:  pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp
    iretq

fault:
    lock btsl $0, fault_flag(%rip)
    jc 5f
    mov (%rsp), %rdi                    /* vector */
    mov 8(%rsp), %rsi                   /* error code */
    mov 16(%rsp), %rdx                  /* rip */
    mov %cr2, %rcx
    mov 24(%rsp), %r8                   /* cs */
    mov 40(%rsp), %r9                   /* rsp */
    lea fault_stack_top(%rip), %rax
    pushq $0x5b
    push %rax
    pushq $0x2                          /* IF = 0 */
    pushq $0x63
    lea fault_user(%rip), %rax
    push %rax
    iretq
fault_user:
    call guest_fault
    ud2
5:  mov $0x7f, %al                      /* nested fault: exit (isa-debug-exit) and halt */
    out %al, $0xf4
6:  cli
    hlt
    jmp 6b

    /* ---- AP trampoline (real mode), copied to TRAMP_BASE ---- */
    .code16
    .globl tramp_start
    .globl tramp_end
tramp_start:
    cli
    cld
    xorl %esi, %esi
    mov %cs, %ax
    mov %ax, %ds
    lgdtl tramp_gdt_ptr - tramp_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x68, $common32
    .balign 8
tramp_gdt_ptr:
    .word gdt_end - gdt64 - 1
    .long gdt64
tramp_end:
    .code64

    .section .data
    .balign 16
gdt64:
    .quad 0
    .quad 0x00af9b000000ffff            /* 0x08 kernel code64 */
    .quad 0x00cf93000000ffff            /* 0x10 kernel data */
    .fill MAX_CPUS * 2, 8, 0            /* 0x18.. TSS descriptors, 16 bytes per CPU */
    .quad 0x00cff3000000ffff            /* 0x58 user data */
    .quad 0x00affb000000ffff            /* 0x60 user code64 */
    .quad 0x00cf9b000000ffff            /* 0x68 kernel code32 */
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt64 - 1
    .quad gdt64
    .balign 8
idt_ptr:
    .word 256*16 - 1
    .quad idt
    .balign 8
    .globl boot_start_info
boot_start_info: .quad 0
ap_next_index: .long 1
fault_flag: .long 0

    .section .bss
    .balign 4096
    .globl boot_pml4
    .globl boot_pdpt
    .globl boot_pds
boot_pml4: .skip 4096
boot_pdpt: .skip 4096 * NR_PDPTS
boot_pds: .skip 4096 * NR_PDS
idt: .skip 4096
tss_area: .skip TSS_SLOT * MAX_CPUS
kstacks: .skip KSTACK_SIZE * MAX_CPUS
ustacks: .skip USTACK_SIZE * MAX_CPUS
    .skip 65536
fault_stack_top:
"#,
    options(att_syntax)
);

extern "C" {
    /// First byte of the AP trampoline.
    pub static tramp_start: u8;
    /// One past the last byte of the AP trampoline.
    pub static tramp_end: u8;
    /// The PDPTs (one entry per GiB: page 0 under PML4[0], page 1 under PML4[1]); live
    /// entries are written only through `svc::WRITE64`.
    pub static mut boot_pdpt: [u64; 512 * NR_PDPTS];
    /// Page directories, `boot_pds[g]` maps GiB `g` (index 0 is live from boot).
    pub static mut boot_pds: [[u64; 512]; NR_PDS];
    /// Start of the loaded image (linker script).
    pub static __image_start: u8;
    /// End of the image including bss, page aligned (linker script).
    pub static __image_end: u8;
}

extern "C" {
    static boot_pml4: u8;
}

/// Physical address of the PML4.
pub fn boot_pml4_addr() -> u64 {
    core::ptr::addr_of!(boot_pml4) as u64
}

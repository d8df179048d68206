/* 64-bit entry of the test guest, as Linux's startup_64: long mode, RSI = boot_params. */
    .section .text.start, "ax"
    .globl _start
    .code64
_start:
    cli
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi          /* boot_params -> first C argument */
    xor %esi, %esi          /* not PVH */
    call guest_main
1:  cli
    hlt
    jmp 1b

    .section .bss
    .balign 16
stack:
    .skip 16384
stack_top:

/*
 * AP trampoline, copied by the BSP to physical 0x6000 (SIPI vector 0x06). An AP starts here in
 * real mode at CS=0x600, IP=0: it records its APIC id (CPUID.1:EBX[31:24]) in the bitmap at
 * 0x6ff4, counts itself in at 0x6ff0 and halts.
 */
    .section .rodata
    .globl ap_tramp_start, ap_tramp_end
    .code16
ap_tramp_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $1, %eax
    cpuid
    shr $24, %ebx
    lock btsl %ebx, 0x6ff4
    lock incw 0x6ff0
1:  hlt
    jmp 1b
ap_tramp_end:
    .code64

/*
 * PVH entry (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off, EBX = hvm_start_info.
 * Loads prebuilt identity page tables for the first GiB (static data: no loop to run at ~1 us per
 * emulated instruction), enters long mode with our own GDT, then joins the 64-bit path with
 * guest_main(start_info, 1).
 */
    .section .text.pvh, "ax"
    .globl pvh_start
    .code32
pvh_start:
    cli
    mov %ebx, %esi
    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                  /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax                 /* EFER.LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax            /* PG | PE */
    mov %eax, %cr0
    lgdt pvh_gdt_desc
    ljmp $0x10, $pvh_long

    .code64
pvh_long:
    mov $0x18, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    lea stack_top(%rip), %rsp
    mov %esi, %edi                  /* hvm_start_info */
    mov $1, %esi                    /* PVH */
    call guest_main
2:  cli
    hlt
    jmp 2b

    .section .rodata
    .balign 8
pvh_gdt:
    .quad 0, 0, 0x00af9b000000ffff, 0x00cf93000000ffff
pvh_gdt_desc:
    .word pvh_gdt_desc - pvh_gdt - 1
    .long pvh_gdt

    .section .data
    .balign 4096
pvh_pml4:
    .quad pvh_pdpt + 3
    .skip 4088
pvh_pdpt:
    .quad pvh_pd + 3
    .skip 4088
pvh_pd:                             /* 512 x 2 MiB: present, writable, large */
    .set i, 0
    .rept 512
    .quad (i << 21) | 0x83
    .set i, i + 1
    .endr

    .section .note.Xen, "a"
    .balign 4
    .long 4, 4, 18                  /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
